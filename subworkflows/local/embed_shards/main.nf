/*
========================================================================================
    EMBED_SHARDS: SENTENCES' shards -> EMBED tasks -> each dataset's embeddings, in shard order
========================================================================================
      a dataset of several shards, or of one shard of >= pack_cells cells:
          one EMBED task per shard, as soon as its SENTENCES is done
      a small dataset (one shard of < pack_cells cells):
          packed with the other small datasets of its species into EMBED tasks of at most
          pack_cells cells (greedy, by sample id), once every SENTENCES of that species is done
    A pack's task starts Python, torch and the model once for all its datasets (on a GPU also the
    CUDA context and the weight transfer); each shard in it is embedded exactly as alone. Packs are
    built in sample-id order from deterministic counts, so -resume reuses them; a dataset added to
    the samplesheet re-packs its species' small datasets (small tasks, rerun). pack_cells 0: no
    packing. A pack of one dataset is a plain task (same id and hash as unpacked).
----------------------------------------------------------------------------------------
*/

include { EMBED } from '../../../modules/local/embed'

workflow EMBED_SHARDS {

    take:
    ch_sentences    // channel: [ meta, shard file(s), shards.json ] per dataset (SENTENCES.out.shards)
    ch_species_file // channel: [ species, species file ] (PREPARE_SPECIES)
    ch_samples      // channel: [ meta, h5ad ] every dataset that reaches SENTENCES
    pack_cells      // integer: --embed_pack_cells (0: one task per shard)

    main:
    // Per dataset: [ meta, [ [shard meta, file, cells], ... ] ]. meta.id names the shard; meta.sample
    // and meta.n_shards let the embeddings be grouped back per dataset.
    ch_datasets = ch_sentences.map { meta, shards, json -> [meta, shardRows(meta, shards, json)] }
        .branch { meta, rows ->
            small: pack_cells > 0 && rows.size() == 1 && rows[0][2] < pack_cells
            other: true
        }

    // Small datasets wait for their species' other datasets (groupKey with the species' dataset
    // count; a dataset that is not small counts with an empty entry), then are packed.
    ch_species_count = ch_samples.map { meta, h5ad -> meta.species }.toList().map { names -> [count: names.countBy { s -> s }] }
    ch_packed = ch_datasets.small.map { meta, rows -> [meta, rows[0]] }
        .mix(ch_datasets.other.map { meta, rows -> [meta, []] })
        .filter { meta, row -> pack_cells > 0 }
        .combine(ch_species_count)
        .map { meta, row, species -> [groupKey(meta.species, species.count[meta.species]), row] }
        .groupTuple()
        .flatMap { species, rows -> packShards(species.toString(), rows.findAll { r -> r }, pack_cells) }

    ch_embed_in = ch_datasets.other
        .flatMap { meta, rows -> rows.collect { r -> [r[0], r[1]] } }
        .mix(ch_packed)
        .map { meta, files -> [meta.species, meta, files] }
        .combine(ch_species_file, by: 0)
        .map { species, meta, files, species_file -> [meta, files, species_file] }
    EMBED(ch_embed_in)

    // Back to one entry per shard (a pack's files by name), then per dataset: groupKey with the
    // shard count releases each dataset's group when complete, without waiting for other
    // datasets. Shards sorted by index: stable MERGE hash.
    ch_embeddings = EMBED.out.embeddings
        .flatMap { meta, npz -> unpackEmbeddings(meta, npz) }
        .map { meta, npz -> [groupKey(meta.sample, meta.n_shards), meta.shard, npz] }
        .groupTuple()
        .map { key, shards, files -> [key.toString(), [shards, files].transpose().sort(false) { p -> p[0] }.collect { p -> p[1] }] }

    emit:
    embeddings = ch_embeddings                 // channel: [ sample id, [ embeddings.npz in shard order ] ]
    versions   = EMBED.out.versions.first()    // channel: versions.yml
}

// [ [shard meta, file, cells], ... ] of one dataset, in shard order. The counts come from SENTENCES'
// small JSON, not from the shards.
def shardRows(meta, shards, json) {
    def cells = new groovy.json.JsonSlurper().parseText(json.text)
    def files = (shards instanceof List ? shards : [shards]).sort(false) { f -> f.name }
    return files.collect { f ->
        def shard = f.name.replaceAll(/^.*\.shard-(\d+)\..*$/, '$1')
        def shard_meta = meta + [id: "${meta.id}.shard-${shard}".toString(), sample: meta.id, shard: shard, n_shards: files.size()]
        [shard_meta, f, cells[f.name] as Long]
    }
}

// Greedy packs of at most pack_cells cells over the species' small shards in sample-id order:
// [ shard meta, file ] for a pack of one, else [ [id: pack-<species>-<k>, species, shards: metas], files ].
def packShards(species, rows, pack_cells) {
    def packs = rows.sort(false) { r -> r[0].sample }.inject([]) { acc, r ->
        if (acc && acc[-1].sum { p -> p[2] } + r[2] <= pack_cells) {
            acc[-1] << r
        } else {
            acc << [r]
        }
        acc
    }
    def multi = packs.findAll { p -> p.size() > 1 }
    def single = packs.findAll { p -> p.size() == 1 }.collect { p -> [p[0][0], p[0][1]] }
    return single + (0..<multi.size()).collect { k ->
        def pack = multi[k]
        [[id: "pack-${species}-${k + 1}".toString(), species: species, shards: pack.collect { r -> r[0] }], pack.collect { r -> r[1] }]
    }
}

// [ shard meta, embeddings.npz ] per shard of an EMBED task (a pack's files matched by name).
def unpackEmbeddings(meta, npz) {
    if (!meta.shards) {
        return [[meta, npz]]
    }
    def files = npz instanceof List ? npz : [npz]
    return meta.shards.collect { m -> [m, files.find { f -> f.name == "${m.id}.embeddings.npz".toString() }] }
}
