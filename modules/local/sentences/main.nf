// Seeded cell-sentence sampling for one dataset, written as shards of at most shard_size
// cells (--shard-size in ext.args). Each shard becomes its own EMBED task.
process SENTENCES {
    tag "${meta.id}"
    label 'process_medium'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    tuple val(meta), path(adata), path(index)

    output:
    tuple val(meta), path("sentences/*.sentences.npz"), emit: shards
    path 'versions.yml'                               , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    // --workers only changes speed, never the sentences (the sampler is seeded per cell/batch)
    """
    uce-sentences \\
        --adata ${adata} \\
        --index ${index} \\
        ${args} \\
        --workers ${task.cpus} \\
        --output-dir sentences \\
        --name ${prefix}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        numpy: \$(python3 -c 'import numpy; print(numpy.__version__)')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    // Two shards, so a stub run exercises the per-shard fan-out and the regrouping.
    """
    mkdir -p sentences
    touch sentences/${prefix}.shard-00000.sentences.npz sentences/${prefix}.shard-00001.sentences.npz

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
