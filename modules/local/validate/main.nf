// Cheap checks of one dataset before any heavy task: readable, raw counts and gene symbols found,
// enough genes of its species, not emptied by the filter (ext.args: --min-cells/--min-genes/
// --no-filter); and any problem SPECIES_VOCAB recorded about the model files of its species.
// Stages the dataset and its species' vocabulary (small), not the model folder.
// A bad dataset does not fail this task: its one-line error goes into <id>.validate.json
// ({"error": ..., "input": staged path}); the workflow collects every dataset's JSON and stops the
// run with one line per bad dataset, naming the sample and the samplesheet's path (which this task
// never sees). Only a crash of the checks themselves fails the task.
process VALIDATE {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // input/ keeps the staged name apart from the outputs; a folder dataset (AnnData .zarr, Cell
    // Ranger mtx) is staged as one
    tuple val(meta), path(h5ad, stageAs: 'input/*'), path(vocab)

    output:
    tuple val(meta), path('*.validate.json'), emit: json
    path 'versions.yml'                     , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def gene   = meta.gene_column  ? "--gene-column '${meta.gene_column}'"   : ''
    def layer  = meta.counts_layer ? "--counts-layer '${meta.counts_layer}'" : ''
    // exit 2 = a problem with the inputs, recorded in the JSON; any other status is a crash of the checks
    """
    rc=0
    uce-validate \\
        --input ${h5ad} \\
        --species '${meta.species}' \\
        --species-vocab ${vocab} \\
        ${gene} \\
        ${layer} \\
        ${args} \\
        --output ${prefix}.validate.json 2> validate.log || rc=\$?
    if [ "\$rc" -eq 2 ] && [ -s ${prefix}.validate.json ]; then
        echo "VALIDATE: sample '${meta.id}': \$(grep -m1 '^ERROR' validate.log || true)" >&2
    elif [ "\$rc" -ne 0 ]; then
        cat validate.log >&2
        exit "\$rc"
    fi

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    echo '{"stub": true}' > ${prefix}.validate.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
