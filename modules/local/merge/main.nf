// Final AnnData of one dataset: processed cells + obsm['X_uce'] (unit-norm rows, cell
// order of the processed AnnData) + uns['uce'] provenance.
process MERGE {
    tag "${meta.id}"
    label 'process_medium'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // embeddings: every shard of this dataset, sorted by shard index (stable task hash)
    tuple val(meta), path(adata), path(embeddings, stageAs: 'embeddings/*'), path(stats), path(species_file)

    output:
    tuple val(meta), path("*_uce_adata.h5ad"), emit: adata
    path 'versions.yml'                      , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def shards = (embeddings instanceof List ? embeddings : [embeddings]).collect { e -> "--embeddings ${e}" }.join(' ')
    """
    uce-merge \\
        --adata ${adata} \\
        ${shards} \\
        --stats ${stats} \\
        --species-file ${species_file} \\
        ${args} \\
        --output ${prefix}_uce_adata.h5ad

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        anndata: \$(python3 -c 'import anndata; print(anndata.__version__)')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}_uce_adata.h5ad

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
