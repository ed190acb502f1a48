// Downloads the official UCE model files (figshare) into model_files/ in the official
// layout. Optional (--download_model_files): the weights are large and their licence is
// unconfirmed, so they are never shipped with the pipeline or its container.
process DOWNLOAD_MODEL_FILES {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    val(meta)

    output:
    tuple val(meta), path('model_files', type: 'dir'), emit: model_dir
    path 'versions.yml'                              , emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    uce-download-model-files \\
        ${args} \\
        --dest model_files

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p model_files/protein_embeddings
    touch model_files/species_chrom.csv model_files/species_offsets.pkl model_files/all_tokens.torch model_files/${meta.model}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
