/*
========================================================================================
    NEW_SPECIES: --species_sheet rows -> the species files of the UCE new-species recipe
========================================================================================
      species row -> PROTEOME (FASTA -> proteins, chromosome csv, chunks)
                  -> ESM_EMBED (one task per chunk, label process_gpu)   [skipped with protein_embeddings]
                  -> GENE_EMBEDDINGS (mean per gene symbol)
                  -> SPECIES_FILES (token file, offsets, chromosome csv; seeded by taxonomy id)
    The channels fan out over species as the main workflow's do over datasets; emit
    species_files has the shape of the per-species model files PREPARE_SPECIES takes.
----------------------------------------------------------------------------------------
*/

include { PROTEOME        } from '../../../modules/local/proteome'
include { ESM_EMBED       } from '../../../modules/local/esm_embed'
include { GENE_EMBEDDINGS } from '../../../modules/local/gene_embeddings'
include { SPECIES_FILES   } from '../../../modules/local/species_files'

workflow NEW_SPECIES {

    take:
    ch_species   // channel: [ meta, fasta, protein_embeddings or [] ] (utils_species_sheet)
    ch_esm_model // value channel: [ esm_model_dir or [], checkpoint ]
    ch_special   // value channel: [ all_tokens.torch (its rows 0-3 are the special tokens), checkpoint ]

    main:
    ch_versions = channel.empty()

    PROTEOME(ch_species.map { meta, fasta, pe -> [meta, fasta] })
    ch_versions = ch_versions.mix(PROTEOME.out.versions.first())

    // One ESM_EMBED task per chunk, for the species without precomputed embeddings. Chunks sorted
    // by name: stable ids and hashes.
    ch_chunks = PROTEOME.out.chunks
        .filter { meta, chunks -> !meta.precomputed }
        .flatMap { meta, chunks ->
            def files = (chunks instanceof List ? chunks : [chunks]).sort(false) { f -> f.name }
            files.collect { f ->
                def k = f.name.replaceAll(/^proteins\.chunk-(\d+)\.tsv$/, '$1')
                [meta + [id: "${meta.id}.chunk-${k}".toString(), chunk: k, n_chunks: files.size()], f]
            }
        }
    ESM_EMBED(ch_chunks, ch_esm_model)
    ch_versions = ch_versions.mix(ESM_EMBED.out.versions.first())

    // all chunks of a species, in chunk order, released as soon as its last chunk is done
    ch_species_chunks = ESM_EMBED.out.embeddings
        .map { meta, pt -> [groupKey(meta.species, meta.n_chunks), meta.chunk, pt] }
        .groupTuple()
        .map { key, ks, pts -> [key.toString(), [ks, pts].transpose().sort(false) { p -> p[0] }.collect { p -> p[1] }] }
    ch_gene_in = PROTEOME.out.proteins
        .filter { meta, proteins -> !meta.precomputed }
        .map { meta, proteins -> [meta.species, meta, proteins] }
        .join(ch_species_chunks)
        .map { species, meta, proteins, pts -> [meta, pts, proteins] }
    GENE_EMBEDDINGS(ch_gene_in)
    ch_versions = ch_versions.mix(GENE_EMBEDDINGS.out.versions.first())

    // gene embeddings: computed, or the sheet's protein_embeddings
    ch_genes = GENE_EMBEDDINGS.out.embeddings
        .mix(ch_species.filter { meta, fasta, pe -> meta.precomputed }.map { meta, fasta, pe -> [meta, pe] })
        .map { meta, pt -> [meta.species, pt] }
    ch_files_in = PROTEOME.out.chrom
        .map { meta, csv -> [meta.species, meta, csv] }
        .join(ch_genes)
        .map { species, meta, csv, pt -> [meta, pt, csv] }
    SPECIES_FILES(ch_files_in, ch_special)
    ch_versions = ch_versions.mix(SPECIES_FILES.out.versions.first())

    emit:
    species_files = SPECIES_FILES.out.species_files // channel: [ meta, spec_chrom_csv, offset_pkl, token_file, protein_embedding_pt ]
    json          = SPECIES_FILES.out.json          // channel: [ meta, species_files.json ]
    chrom         = PROTEOME.out.chrom              // channel: [ meta, <species>_chrom.csv ] (VALIDATE's vocabulary)
    versions      = ch_versions
}
