// One HTML report over all datasets (report/uce_report.html: cell/gene counts, filter
// statistics, embedding checks, 2-D maps coloured by --color_by, and the atlas section when
// ATLAS ran, the species section), plus MultiQC custom content (uce_mqc.json per sample,
// uce_species_mqc.json per species) and a JSON summary. It reads the small per-sample summaries
// MERGE writes (<id>.summary.json + .npz, with the species file's numbers), never the final h5ads
// or species files, so a run of hundreds of datasets stages megabytes here, not the embeddings.
process REPORT {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // summaries: <id>.summary.json and <id>.summary.npz of every dataset, sorted by name
    // atlas: ATLAS's atlas_summary.json and *_mqc.png/tsv, or [] (no atlas)
    tuple val(meta), path(summaries, stageAs: 'summaries/*'), path(atlas, stageAs: 'atlas/*')

    output:
    tuple val(meta), path('report')                 , emit: report
    tuple val(meta), path('report/*_mqc.json')      , emit: mqc
    path 'versions.yml'                             , emit: versions

    script:
    def args  = task.ext.args ?: ''
    def files = (summaries instanceof List ? summaries : [summaries]).findAll { f -> f.name.endsWith('.summary.json') }.collect { f -> "--summary ${f}" }.join(' ')
    def atlas_dir = atlas ? '--atlas-dir atlas' : ''
    """
    uce-report \\
        ${files} \\
        ${atlas_dir} \\
        ${args} \\
        --output-dir report

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        matplotlib: \$(python3 -c 'import matplotlib; print(matplotlib.__version__)')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p report
    touch report/uce_report.html
    echo '{}' > report/uce_mqc.json
    echo '{}' > report/uce_species_mqc.json
    echo '{}' > report/uce_summary.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
