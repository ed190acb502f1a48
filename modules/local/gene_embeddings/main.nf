// Gene embeddings of a new species: the mean over each gene symbol's proteins, from all of its
// ESM_EMBED chunks, written under the official name <Species>.<assembly>.gene_symbol_to_embedding_ESM2.pt.
process GENE_EMBEDDINGS {
    tag "${meta.id}"
    label 'process_single'

    input:
    tuple val(meta), path(chunks, stageAs: 'chunks/*'), path(proteins)

    output:
    tuple val(meta), path("${meta.gene_embeddings_file}"), emit: embeddings
    path 'versions.yml'                                  , emit: versions

    script:
    def args  = task.ext.args ?: ''
    def files = (chunks instanceof List ? chunks : [chunks]).collect { c -> "--embeddings ${c}" }.join(' ')
    """
    uce-gene-embeddings \\
        ${files} \\
        --proteins ${proteins} \\
        ${args} \\
        --output ${meta.gene_embeddings_file}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
    END_VERSIONS
    """

    stub:
    """
    touch ${meta.gene_embeddings_file}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: stub
    END_VERSIONS
    """
}
