// Species vocabulary, chromosome codes and the model's projected token table for one
// (species, checkpoint). Runs once per species and is shared by all datasets of it.
process PREPARE_SPECIES {
    tag "${meta.id}"
    label 'process_medium'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    val(meta)
    tuple path(model_dir, stageAs: 'model_files'), path(checkpoint, stageAs: 'checkpoint/*'), path(spec_chrom_csv, stageAs: 'overrides/chrom/*'), path(offset_pkl, stageAs: 'overrides/offsets/*'), path(token_file, stageAs: 'overrides/tokens/*'), path(protein_embeddings_dir, stageAs: 'overrides/protein/*')

    output:
    tuple val(meta), path("*.species.pt"), emit: species
    path 'versions.yml'                  , emit: versions

    script:
    def args      = task.ext.args ?: ''
    def prefix    = task.ext.prefix ?: "${meta.id}"
    def overrides = modelOverrides(spec_chrom_csv, offset_pkl, token_file, protein_embeddings_dir)
    """
    uce-prepare-species \\
        --species ${meta.species} \\
        --model-dir model_files \\
        --model ${checkpoint} \\
        ${overrides} \\
        ${args} \\
        --output ${prefix}.species.pt

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
    touch ${prefix}.species.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}

// Command-line flags for the model-file overrides that were given (empty inputs are []).
def modelOverrides(spec_chrom_csv, offset_pkl, token_file, protein_embeddings_dir) {
    return [
        spec_chrom_csv         ? "--spec-chrom-csv ${spec_chrom_csv}"                 : '',
        offset_pkl             ? "--offset-pkl ${offset_pkl}"                         : '',
        token_file             ? "--token-file ${token_file}"                         : '',
        protein_embeddings_dir ? "--protein-embeddings-dir ${protein_embeddings_dir}" : '',
    ].findAll { f -> f }.join(' ')
}
