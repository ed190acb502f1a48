// Token id, chromosome code and genomic start of every processed gene.
process INDEX {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    tuple val(meta), path(adata), path(species_file)

    output:
    tuple val(meta), path("*.index.npz"), emit: index
    path 'versions.yml'                 , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    uce-index \\
        --adata ${adata} \\
        --species-file ${species_file} \\
        ${args} \\
        --output ${prefix}.index.npz

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.index.npz

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
