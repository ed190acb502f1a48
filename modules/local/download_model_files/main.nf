// Downloads the official UCE model files (figshare) in the official layout. Optional
// (--download_model_files): the weights are large and their licence is unconfirmed, so
// they are never shipped with the pipeline or its container. meta.name is the folder to
// fill and meta.store_dir its parent: storeDir (conf/modules.config) keeps the folder there
// and skips the download in later runs once it is complete.
process DOWNLOAD_MODEL_FILES {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    val(meta)

    output:
    // No versions.yml: storeDir would leave it next to the user's model folder.
    tuple val(meta), path("${meta.name}", type: 'dir'), emit: model_dir

    script:
    def args = task.ext.args ?: ''
    """
    uce-download-model-files \\
        ${args} \\
        --dest ${meta.name}
    """

    stub:
    """
    mkdir -p ${meta.name}/protein_embeddings
    touch ${meta.name}/species_chrom.csv ${meta.name}/species_offsets.pkl ${meta.name}/all_tokens.torch ${meta.name}/${meta.model}
    """
}
