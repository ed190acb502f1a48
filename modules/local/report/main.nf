// One HTML report over all datasets (report/uce_report.html: cell/gene counts, filter
// statistics, embedding checks, 2-D maps coloured by --color_by), plus MultiQC custom
// content (uce_mqc.json) and a JSON summary.
process REPORT {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    tuple val(meta), path(adatas, stageAs: 'adata/*')

    output:
    tuple val(meta), path('report'), emit: report
    path 'versions.yml'            , emit: versions

    script:
    def args  = task.ext.args ?: ''
    def files = (adatas instanceof List ? adatas : [adatas]).collect { a -> "--adata ${a}" }.join(' ')
    """
    uce-report \\
        ${files} \\
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
    echo '{}' > report/uce_summary.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
