// The species files of the UCE new-species recipe: token table (the 4 special rows of the model's
// all_tokens.torch, the gene rows, chromosome rows seeded by the taxonomy id), species_offsets.pkl
// {species: 4}, the chromosome csv, the gene embeddings; token width checked against the checkpoint.
// Emits the per-species tuple PREPARE_SPECIES takes: [ meta, spec_chrom_csv, offset_pkl, token_file, protein_embedding_pt ].
process SPECIES_FILES {
    tag "${meta.id}"
    label 'process_low'

    input:
    tuple val(meta), path(gene_embeddings, stageAs: 'gene_embeddings/*'), path(chrom_csv, stageAs: 'chrom/*')
    tuple path(special_tokens, stageAs: 'special/*'), path(checkpoint, stageAs: 'checkpoint/*')

    output:
    tuple val(meta), path("${meta.id}/species_chrom.csv"), path("${meta.id}/species_offsets.pkl"), path("${meta.id}/all_tokens.torch"), path("${meta.id}/protein_embeddings/*.pt"), emit: species_files
    tuple val(meta), path("${meta.id}/species_files.json"), emit: json
    path("${meta.id}/new_species_protein_embeddings.csv")  , emit: layout   // published: the folder works with `uce run --model-dir`
    path 'versions.yml'                                   , emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    uce-species-files \\
        --species ${meta.species} \\
        --taxonomy-id ${meta.taxonomy_id} \\
        --gene-embeddings ${gene_embeddings} \\
        --chrom-csv ${chrom_csv} \\
        --special-tokens ${special_tokens} \\
        --checkpoint ${checkpoint} \\
        ${args} \\
        --output-dir ${meta.id}
    rm -f ${meta.id}/\$(basename ${checkpoint})   # the link to the checkpoint: PREPARE_SPECIES gets it from --model

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p ${meta.id}/protein_embeddings
    touch ${meta.id}/species_chrom.csv ${meta.id}/species_offsets.pkl ${meta.id}/all_tokens.torch ${meta.id}/protein_embeddings/${meta.gene_embeddings_file}
    echo '{}' > ${meta.id}/species_files.json
    touch ${meta.id}/new_species_protein_embeddings.csv

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: stub
    END_VERSIONS
    """
}
