// The model-independent half of a species file: vocabulary, token ids, chromosome codes and starts
// (what VALIDATE, PREPROCESS and INDEX read). Stages four explicit files and no checkpoint, so
// switching --model, or adding a file to --model_dir, leaves it (and everything after it) cached.
// A problem with the model files does not fail this task: `--record-errors` writes it into the
// vocabulary, and VALIDATE reports it once per dataset of the species, in the user's terms.
process SPECIES_VOCAB {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // protein_embedding is [] for a species without a known embeddings file (the step says so)
    // other_protein_embeddings: the files named in meta.other_species (species -> file name; only their sizes are
    // read, to prove a replaced token file's chromosome offset); [] when --chrom_token_offset is given
    tuple val(meta), path(spec_chrom_csv, stageAs: 'model/chrom/*'), path(offset_pkl, stageAs: 'model/offsets/*'), path(token_file, stageAs: 'model/tokens/*'), path(protein_embedding, stageAs: 'model/protein/*'), path(other_protein_embeddings, stageAs: 'model/other_protein/*')

    output:
    tuple val(meta), path("*.vocab.pt"), emit: vocab
    path 'versions.yml'                , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def pe     = protein_embedding ? "--protein-embedding ${protein_embedding}" : ''
    def others = (meta.other_species ?: [:]).collect { sp, name -> "--other-protein-embedding ${sp}=model/other_protein/${name}" }.join(' ')
    """
    uce-species-vocab \\
        --species ${meta.species} \\
        --spec-chrom-csv ${spec_chrom_csv} \\
        --offset-pkl ${offset_pkl} \\
        --token-file ${token_file} \\
        ${pe} \\
        ${others} \\
        --record-errors \\
        ${args} \\
        --output ${prefix}.vocab.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.vocab.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
