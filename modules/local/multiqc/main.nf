// MultiQC over the run: the custom content of REPORT (uce_mqc.json) and ATLAS (*_mqc.png/tsv),
// the collated software versions (*_mqc_versions.yml: MultiQC's own "Software Versions"
// section) and assets/multiqc_config.yml (+ --multiqc_config). Offline: no version check.
process MULTIQC {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // files: custom content, staged in numbered folders (two inputs may share a name)
    tuple val(meta), path(files, stageAs: '?/*'), path(versions, stageAs: 'uce_nf_software_mqc_versions.yml'), path(config, stageAs: 'config/*'), path(extra_config, stageAs: 'extra_config/*')

    output:
    tuple val(meta), path('multiqc_report.html'), emit: report
    tuple val(meta), path('multiqc_data')       , emit: data
    tuple val(meta), path('multiqc_plots')      , emit: plots, optional: true
    path 'versions.yml'                         , emit: versions

    script:
    def args  = task.ext.args ?: ''
    def extra = extra_config ? "--config ${extra_config}" : ''
    """
    # MultiQC asks multiqc.info for a newer version unless told not to; tasks may have no network
    export MULTIQC_NO_VERSION_CHECK=true
    multiqc \\
        --force \\
        --no-ansi \\
        --config ${config} \\
        ${extra} \\
        ${args} \\
        --cl-config 'data_dir_name: multiqc_data' \\
        --cl-config 'plots_dir_name: multiqc_plots' \\
        --filename multiqc_report.html \\
        .

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        multiqc: \$(multiqc --version | sed 's/.*version //')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p multiqc_data
    touch multiqc_report.html

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        multiqc: \$(multiqc --version 2>/dev/null | sed 's/.*version //' || echo stub)
    END_VERSIONS
    """
}
