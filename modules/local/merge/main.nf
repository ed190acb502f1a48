// Result of one dataset: obsm['X_uce'] streamed shard by shard (unit-norm rows), obs
// uce_input_row / uce_input_name, uns['uce'] provenance. ext.args '--output-mode' picks the file:
//   full       -> <id>_uce_adata.h5ad: the processed cells and counts (the reference's file)
//   embeddings -> <id>_uce.h5ad (every input cell, input order, no counts) + <id>_uce.parquet
process MERGE {
    tag "${meta.id}"
    // streaming: ~1.0 GB (full) / 1.3 GB (embeddings) peak RSS at 2M cells x 1,280 dims (docs/benchmarks.md)
    label 'process_low'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // embeddings: every shard of this dataset, sorted by shard index (stable task hash)
    // input_h5ad: the dataset PREPROCESS read (its obs only is read), or [] in full mode
    tuple val(meta), path(adata), path(embeddings, stageAs: 'embeddings/*'), path(stats), path(species_file), path(input_h5ad, stageAs: 'input/*')

    output:
    tuple val(meta), path("*_uce{_adata,}.h5ad"), emit: adata
    tuple val(meta), path("*_uce.parquet")      , emit: parquet, optional: true
    // small summary for REPORT: numbers + the map's sampled cells (PCs, obs values), KB-MB
    tuple val(meta), path("*.summary.{json,npz}"), emit: summary
    path 'versions.yml'                         , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def shards = (embeddings instanceof List ? embeddings : [embeddings]).collect { e -> "--embeddings ${e}" }.join(' ')
    def embeddings_only = args ==~ /.*--output-mode[ =]embeddings\b.*/
    def input = input_h5ad ? "--input ${input_h5ad}" : ''
    """
    uce-merge \\
        --adata ${adata} \\
        ${shards} \\
        --stats ${stats} \\
        --species-file ${species_file} \\
        ${input} \\
        ${args} \\
        --summary ${prefix}.summary.json \\
        --output ${prefix}${embeddings_only ? '_uce.h5ad' : '_uce_adata.h5ad'}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        anndata: \$(python3 -c 'import anndata; print(anndata.__version__)')
    END_VERSIONS
    """

    stub:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def embeddings_only = args ==~ /.*--output-mode[ =]embeddings\b.*/
    """
    touch ${prefix}${embeddings_only ? '_uce.h5ad' : '_uce_adata.h5ad'}
    ${embeddings_only ? "touch ${prefix}_uce.parquet" : ''}
    echo '{}' > ${prefix}.summary.json
    touch ${prefix}.summary.npz

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
