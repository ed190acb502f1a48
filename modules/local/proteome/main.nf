// A new species' reference proteome: Ensembl peptide FASTA -> proteins.tsv (stop-codon sequences
// and symbol-less proteins dropped), <species>_chrom.csv and N chunks of near-equal residues, one
// per ESM_EMBED task. Cheap (one pass over the FASTA); VALIDATE reads the chromosome csv as the
// species' vocabulary.
process PROTEOME {
    tag "${meta.id}"
    label 'process_single'

    input:
    tuple val(meta), path(fasta)

    output:
    tuple val(meta), path("${meta.id}/proteins.tsv")           , emit: proteins
    tuple val(meta), path("${meta.id}/proteins.chunk-*.tsv")   , emit: chunks
    tuple val(meta), path("${meta.id}/${meta.species}_chrom.csv"), emit: chrom
    tuple val(meta), path("${meta.id}/proteome.json")          , emit: json
    path 'versions.yml'                                       , emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    uce-proteome \\
        --fasta ${fasta} \\
        --species ${meta.species} \\
        ${args} \\
        --output-dir ${meta.id}
    # one chunk: the whole table is the chunk
    [ -e ${meta.id}/proteins.chunk-000.tsv ] || cp ${meta.id}/proteins.tsv ${meta.id}/proteins.chunk-000.tsv

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        biopython: \$(python3 -c 'import Bio; print(Bio.__version__)')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p ${meta.id}
    printf 'protein_id\\tgene_symbol\\tsequence\\n' > ${meta.id}/proteins.tsv
    cp ${meta.id}/proteins.tsv ${meta.id}/proteins.chunk-000.tsv
    echo 'species,gene_symbol,chromosome,start' > ${meta.id}/${meta.species}_chrom.csv
    echo '{}' > ${meta.id}/proteome.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: stub
    END_VERSIONS
    """
}
