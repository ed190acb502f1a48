/*
========================================================================================
    UCE: samplesheet -> one embedded AnnData per dataset + one report
========================================================================================
    Channel graph (docs/design.md):

      samplesheet -> VALIDATE (once, cheap; every other task waits for it)
      (species, model) -> PREPARE_SPECIES (once per species, shared by its datasets)
      dataset -> PREPROCESS -> INDEX -> SENTENCES -> shard files
              -> EMBED (one task per shard) -> MERGE (per dataset) -> REPORT (all)

    Only deterministic values reach the processes (no timestamps, no arrival order), so
    -resume reuses every finished task.
----------------------------------------------------------------------------------------
*/

include { DOWNLOAD_MODEL_FILES   } from '../modules/local/download_model_files'
include { VALIDATE               } from '../modules/local/validate'
include { PREPARE_SPECIES        } from '../modules/local/prepare_species'
include { PREPROCESS             } from '../modules/local/preprocess'
include { INDEX                  } from '../modules/local/index'
include { SENTENCES              } from '../modules/local/sentences'
include { EMBED                  } from '../modules/local/embed'
include { MERGE                  } from '../modules/local/merge'
include { REPORT                 } from '../modules/local/report'
include { asBool                 } from '../subworkflows/local/utils_params'
include { softwareVersionsToYAML; workflowVersionToYAML } from '../subworkflows/local/utils_uce_pipeline'

workflow UCE {

    take:
    ch_samplesheet // channel: [ meta, h5ad ] in samplesheet order
    samplesheet    // string : samplesheet path (names the VALIDATE task)

    main:
    ch_versions = channel.empty()

    //
    // Model files: the official layout in --model_dir, or downloaded by the run.
    // --model is a file name inside it, or a path to a checkpoint anywhere.
    //
    def model_name = params.model.toString().tokenize('/')[-1]
    def model_path = params.model.toString().contains('/') ? file(params.model.toString(), checkIfExists: true) : null
    if (asBool(params.download_model_files)) {
        // into --model_dir when given (kept for later runs), else <outdir>/model_files
        def dest = file(params.model_dir ? params.model_dir.toString() : "${params.outdir}/model_files")
        DOWNLOAD_MODEL_FILES([id: dest.name, name: dest.name, store_dir: dest.parent.toUriString(), model: model_name])
        ch_model_dir = DOWNLOAD_MODEL_FILES.out.model_dir.map { meta, dir -> dir }
    } else {
        ch_model_dir = channel.value(file(params.model_dir.toString(), checkIfExists: true))
    }
    // Overrides of single model files; [] stages nothing.
    def overrides = [params.spec_chrom_csv, params.offset_pkl, params.token_file, params.protein_embeddings_dir].collect { p -> optionalFile(p) }
    // value channel: [ model_dir, checkpoint, spec_chrom_csv, offset_pkl, token_file, protein_embeddings_dir ]
    ch_model = ch_model_dir.map { dir -> [dir, model_path ?: dir.resolve(model_name)] + overrides }

    //
    // VALIDATE the whole samplesheet once. Sorted by sample id: stable task hash.
    //
    def sheet_name = file(samplesheet).name
    ch_validate_in = ch_samplesheet
        .toSortedList { a, b -> a[0].id <=> b[0].id }
        .map { rows -> [[id: sheet_name], rows.collect { r -> r[0] }, rows.collect { r -> r[1] }] }
    VALIDATE(ch_validate_in, ch_model)
    ch_versions = ch_versions.mix(VALIDATE.out.versions)

    // Gate: datasets enter the heavy steps only once VALIDATE has passed. VALIDATE records bad
    // datasets in its JSON instead of failing, so the run stops here with one line per bad dataset
    // in the user's terms (sample id, samplesheet path), not in a task's staged paths.
    ch_user_paths = ch_samplesheet
        .toList()
        .map { rows -> [h5ads: rows.collectEntries { r -> [r[0].id, r[1]] }] }
    ch_validated = VALIDATE.out.json
        .combine(ch_user_paths)
        .combine(ch_model.map { files -> [model: files] })
        .map { meta, json, user, model ->
            def bad = validationErrors(json, user.h5ads, model.model)
            if (bad) {
                error(bad.join('\n'))
            }
            json
        }
    ch_samples = ch_samplesheet
        .combine(ch_validated)
        .map { meta, h5ad, json -> [meta, h5ad] }

    //
    // PREPARE_SPECIES once per (species, model), shared by every dataset of that species.
    //
    ch_species_in = ch_samples
        .map { meta, h5ad -> meta.species }
        .unique()
        .map { species -> [id: species, species: species, model: model_name] }
    PREPARE_SPECIES(ch_species_in, ch_model)
    ch_versions = ch_versions.mix(PREPARE_SPECIES.out.versions.first())
    ch_species_file = PREPARE_SPECIES.out.species.map { meta, f -> [meta.species, f] }

    //
    // Per dataset: PREPROCESS -> INDEX -> SENTENCES
    //
    ch_preprocess_in = ch_samples
        .map { meta, h5ad -> [meta.species, meta, h5ad] }
        .combine(ch_species_file, by: 0)
        .map { species, meta, h5ad, species_file -> [meta, h5ad, species_file] }
    PREPROCESS(ch_preprocess_in)
    ch_versions = ch_versions.mix(PREPROCESS.out.versions.first())

    // species file of each dataset, by sample id
    ch_sample_species = ch_preprocess_in.map { meta, h5ad, species_file -> [meta.id, species_file] }

    ch_index_in = PREPROCESS.out.adata
        .map { meta, adata -> [meta.id, meta, adata] }
        .join(ch_sample_species)
        .map { id, meta, adata, species_file -> [meta, adata, species_file] }
    INDEX(ch_index_in)
    ch_versions = ch_versions.mix(INDEX.out.versions.first())

    SENTENCES(PREPROCESS.out.adata.join(INDEX.out.index))
    ch_versions = ch_versions.mix(SENTENCES.out.versions.first())

    //
    // One EMBED task per shard. meta.id names the shard; meta.sample and meta.n_shards
    // let the embeddings be grouped back per dataset as soon as its last shard is done.
    //
    ch_shards = SENTENCES.out.shards.flatMap { meta, shards ->
        def files = (shards instanceof List ? shards : [shards]).sort { f -> f.name }
        files.collect { f ->
            def shard = f.name.replaceAll(/^.*\.shard-(\d+)\..*$/, '$1')
            [meta + [id: "${meta.id}.shard-${shard}".toString(), sample: meta.id, shard: shard, n_shards: files.size()], f]
        }
    }
    ch_embed_in = ch_shards
        .map { meta, shard -> [meta.sample, meta, shard] }
        .combine(ch_sample_species, by: 0)
        .map { id, meta, shard, species_file -> [meta, shard, species_file] }
    EMBED(ch_embed_in)
    ch_versions = ch_versions.mix(EMBED.out.versions.first())

    // groupKey with the shard count: each dataset's group is released when complete,
    // without waiting for other datasets. Shards sorted by index: stable MERGE hash.
    ch_embeddings = EMBED.out.embeddings
        .map { meta, npz -> [groupKey(meta.sample, meta.n_shards), meta.shard, npz] }
        .groupTuple()
        .map { key, shards, files -> [key.toString(), [shards, files].transpose().sort { p -> p[0] }.collect { p -> p[1] }] }

    //
    // MERGE per dataset, then one REPORT over all datasets.
    //
    // --output_mode embeddings writes every input cell with the input's obs, so MERGE stages the
    // dataset's own h5ad (and reads its obs only); full mode stages nothing ([]).
    def embeddings_only = params.output_mode.toString() == 'embeddings'
    ch_sample_h5ad = ch_samples.map { meta, h5ad -> [meta.id, embeddings_only ? h5ad : []] }
    ch_merge_in = PREPROCESS.out.adata
        .join(PREPROCESS.out.stats)
        .map { meta, adata, stats -> [meta.id, meta, adata, stats] }
        .join(ch_embeddings)
        .join(ch_sample_species)
        .join(ch_sample_h5ad)
        .map { id, meta, adata, stats, embeddings, species_file, h5ad -> [meta, adata, embeddings, stats, species_file, h5ad] }
    MERGE(ch_merge_in)
    ch_versions = ch_versions.mix(MERGE.out.versions.first())

    ch_report_in = MERGE.out.adata
        .map { meta, adata -> adata }
        .collect(sort: { a, b -> a.name <=> b.name })
        .map { files -> [[id: 'report'], files] }
    REPORT(ch_report_in)
    ch_versions = ch_versions.mix(REPORT.out.versions)

    //
    // pipeline_info/software_versions.yml
    //
    softwareVersionsToYAML(ch_versions)
        .mix(channel.of(workflowVersionToYAML()))
        .collectFile(storeDir: "${params.outdir}/pipeline_info", name: 'software_versions.yml', sort: true, newLine: true)

    emit:
    adata    = MERGE.out.adata        // channel: [ meta, <sample>_uce_adata.h5ad ]
    report   = REPORT.out.report      // channel: [ meta, report/ ]
    versions = ch_versions            // channel: versions.yml files
}

// One line per dataset that failed VALIDATE: "VALIDATE: sample 'id' (<samplesheet path>): <what,
// how to fix>", with the task's staged names (inputs/N/x.h5ad, model_files/...) put back to the
// user's paths. Empty when every dataset passed (and for a stub run's placeholder JSON).
def validationErrors(json, h5ads, model) {
    def results = new groovy.json.JsonSlurper().parseText(json.text)
    def failed = results.findAll { id, r -> r instanceof Map && r.error }
    // stageAs names of VALIDATE's model inputs -> the files they stand for
    def staged = [['model_files', model[0]], ["checkpoint/${model[1].name}", model[1]]]
    ['chrom', 'offsets', 'tokens', 'protein'].eachWithIndex { dir, i ->
        if (model[i + 2]) {
            staged << ["overrides/${dir}/${model[i + 2].name}", model[i + 2]]
        }
    }
    def order = h5ads.keySet().toList()   // samplesheet order
    return failed.sort { a, b -> order.indexOf(a.key) <=> order.indexOf(b.key) }.collect { id, r ->
        def user = h5ads[id] instanceof java.nio.file.Path ? h5ads[id].toUriString() : (h5ads[id] ?: r.input).toString()
        def msg = r.error.toString()
        def input = r.input?.toString()
        if (input && msg.startsWith(input + ': ')) {
            msg = msg.substring(input.length() + 2)   // the line names the file already
        }
        if (input) {
            msg = msg.replace(input, user)
        }
        staged.each { name, real ->
            def to = java.util.regex.Matcher.quoteReplacement(real instanceof java.nio.file.Path ? real.toUriString() : real.toString())
            msg = msg.replaceAll('(?<![\\w./-])' + java.util.regex.Pattern.quote(name.toString()) + '(?=/|:|$)', to)
        }
        "VALIDATE: sample '${id}' (${user}): ${msg}".toString()
    }
}

// A file that must exist, or [] (an empty path input) when the param is not set.
def optionalFile(p) {
    return p ? file(p.toString(), checkIfExists: true) : []
}
