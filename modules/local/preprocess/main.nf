// Cell/gene filter of the reference on sparse chunks; keeps genes that have a protein
// embedding. The input h5ad is only read. Streaming, over row ranges in task.cpus worker
// processes (same output for any count); 1.5 GB peak RSS for 1M cells x 20k genes in one
// process (docs/benchmarks.md), hence process_low.
process PREPROCESS {
    tag "${meta.id}"
    label 'process_low'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // input/ keeps a user file named like an output (<id>_proc.h5ad) from clashing with it; a
    // folder dataset (AnnData .zarr, Cell Ranger mtx) is staged as a folder, read in place
    tuple val(meta), path(h5ad, stageAs: 'input/*'), path(species_file)

    output:
    tuple val(meta), path("*_proc.h5ad")       , emit: adata
    tuple val(meta), path("*.preprocess.json") , emit: stats
    path 'versions.yml'                        , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    // Per-dataset settings from the samplesheet's optional columns
    def gene   = meta.gene_column  ? "--gene-column '${meta.gene_column}'"   : ''
    def layer  = meta.counts_layer ? "--counts-layer '${meta.counts_layer}'" : ''
    """
    uce-preprocess \\
        --input ${h5ad} \\
        --species-file ${species_file} \\
        ${gene} \\
        ${layer} \\
        ${args} \\
        --workers ${task.cpus} \\
        --output ${prefix}_proc.h5ad \\
        --stats ${prefix}.preprocess.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}_proc.h5ad
    echo '{"stub": true}' > ${prefix}.preprocess.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
