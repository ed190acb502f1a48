/*
========================================================================================
    UCE: samplesheet -> one embedded AnnData per dataset + one report
========================================================================================
    Channel graph (docs/design.md):

      species files -> SPECIES_VOCAB (per species; no checkpoint)
      dataset + vocab -> VALIDATE (per dataset, cheap; every heavy task waits for all of them)
      vocab + checkpoint -> PREPARE_SPECIES (per species and checkpoint, shared by its datasets)
      dataset + vocab -> PREPROCESS -> INDEX -> SENTENCES -> shard files
      shard + species file -> EMBED (one task per shard; small datasets' shards packed
        per species, subworkflows/local/embed_shards) -> MERGE (per dataset)
      all MERGE outputs (samplesheet order) -> ATLAS (>= 2 datasets, --atlas)
      MERGE summaries + ATLAS maps -> REPORT; REPORT + ATLAS + versions -> MULTIQC

    Only deterministic values reach the processes (no timestamps, no arrival order), so
    -resume reuses every finished task.
----------------------------------------------------------------------------------------
*/

include { DOWNLOAD_MODEL_FILES   } from '../modules/local/download_model_files'
include { SPECIES_VOCAB          } from '../modules/local/species_vocab'
include { VALIDATE               } from '../modules/local/validate'
include { PREPARE_SPECIES        } from '../modules/local/prepare_species'
include { PREPROCESS             } from '../modules/local/preprocess'
include { INDEX                  } from '../modules/local/index'
include { SENTENCES              } from '../modules/local/sentences'
include { MERGE                  } from '../modules/local/merge'
include { REPORT                 } from '../modules/local/report'
include { ATLAS                  } from '../modules/local/atlas'
include { MULTIQC                } from '../modules/local/multiqc'
include { NEW_SPECIES            } from '../subworkflows/local/new_species'
include { EMBED_SHARDS           } from '../subworkflows/local/embed_shards'
include { asBool                 } from '../subworkflows/local/utils_params'
include { softwareVersionsToYAML; workflowVersionToYAML } from '../subworkflows/local/utils_uce_pipeline'

workflow UCE {

    take:
    ch_samplesheet // channel: [ meta, h5ad ] in samplesheet order
    samplesheet    // string : samplesheet path (unused since VALIDATE runs per dataset; kept for the entry workflow)
    ch_new_species // channel: [ meta, fasta, protein_embeddings or [] ] (--species_sheet rows)

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
    // Only PREPARE_SPECIES stages the checkpoint.
    ch_checkpoint = ch_model_dir.map { dir -> model_path ?: dir.resolve(model_name) }

    //
    // Explicit model files per species, never the folder, so a file added to --model_dir (the other
    // checkpoint) changes no task hash. NEW_SPECIES tuples (issue 13) mix into this channel.
    // channel: [ meta (id, species, other_species), spec_chrom_csv, offset_pkl, token_file, protein_embedding_pt, other_pts ]
    //
    // New species (--species_sheet): FASTA -> proteins -> ESM2 -> genes -> species files. Special
    // tokens: rows 0-3 of the model's token file (--token_file or <model_dir>/all_tokens.torch).
    def esm_model = params.esm_model ? file(params.esm_model.toString(), checkIfExists: true) : []
    NEW_SPECIES(
        ch_new_species,
        ch_checkpoint.map { ckpt -> [esm_model, ckpt] },
        ch_model_dir.map { dir -> [params.token_file ? file(params.token_file.toString()) : dir.resolve('all_tokens.torch'), model_path ?: dir.resolve(model_name)] }
    )
    ch_versions = ch_versions.mix(NEW_SPECIES.out.versions)

    // built-in species from the model files; the species sheet's names excluded (wrapped: combine
    // would otherwise splice the list into the tuple)
    ch_species_files = ch_samplesheet
        .map { meta, h5ad -> meta.species }
        .unique()
        .combine(ch_new_species.map { meta, fasta, pe -> meta.species }.toList().map { names -> [names] })
        .filter { species, new_names -> !(species in new_names) }
        .map { species, new_names -> species }
        .combine(ch_model_dir)
        .map { species, dir -> speciesFiles(species, dir) }
        .mix(NEW_SPECIES.out.species_files.map { meta, chrom, offsets, tokens, pe ->
            [[id: meta.species, species: meta.species, new_species: true, other_species: [:], source: meta.source, taxonomy_id: meta.taxonomy_id], chrom, offsets, tokens, pe, []] })

    //
    // SPECIES_VOCAB once per species (model-independent), then VALIDATE once per dataset against it.
    //
    SPECIES_VOCAB(ch_species_files)
    ch_versions = ch_versions.mix(SPECIES_VOCAB.out.versions.first())
    ch_vocab = SPECIES_VOCAB.out.vocab.map { meta, f -> [meta.species, f] }

    ch_validate_in = ch_samplesheet
        .map { meta, h5ad -> [meta.species, meta, h5ad] }
        .combine(ch_vocab, by: 0)
        .map { species, meta, h5ad, vocab -> [meta, h5ad, vocab] }
    VALIDATE(ch_validate_in)
    ch_versions = ch_versions.mix(VALIDATE.out.versions.first())

    // Gate: datasets enter the heavy steps only once every VALIDATE has passed. VALIDATE records bad
    // datasets in its JSON instead of failing, so the run stops here with one line per bad dataset
    // in the user's terms (sample id, samplesheet path, model file paths), not in a task's staged
    // paths. pipeline_info/validated.json and samplesheet.valid.csv are written here, also on failure.
    ch_user_rows = ch_samplesheet.toList().map { rows -> [rows: rows] }
    ch_user_files = ch_species_files.toList().map { rows -> [files: rows.collectEntries { r -> [r[0].species, r[1..4]] }] }
    ch_validated = VALIDATE.out.json
        .map { meta, json -> [meta.id, json] }
        .toList()
        .map { results -> [results: results] }
        .combine(ch_user_rows)
        .combine(ch_user_files)
        .map { res, user, model ->
            def summary = validationSummary(res.results, user.rows, model.files)
            writeValidation(summary, user.rows)
            if (summary.errors) {
                error(summary.errors.join('\n'))
            }
            true
        }
    ch_samples = ch_samplesheet
        .combine(ch_validated)
        .map { meta, h5ad, ok -> [meta, h5ad] }

    //
    // PREPARE_SPECIES once per (species, checkpoint): the vocabulary projected by the checkpoint.
    // Validated first; the datasets of a species wait for it, so a bad checkpoint stops the run
    // (one line) before any heavy step.
    //
    ch_prepare_in = ch_vocab
        .combine(ch_validated)
        .combine(ch_checkpoint)
        .map { species, vocab, ok, ckpt -> [[id: species, species: species, model: model_name], vocab, ckpt] }
    PREPARE_SPECIES(ch_prepare_in)
    ch_versions = ch_versions.mix(PREPARE_SPECIES.out.versions.first())
    ch_species_file = PREPARE_SPECIES.out.species.map { meta, f -> [meta.species, f] }

    //
    // Per dataset: PREPROCESS -> INDEX -> SENTENCES
    //
    // PREPROCESS and INDEX read the vocabulary only: a new --model leaves them cached.
    ch_preprocess_in = ch_samples
        .map { meta, h5ad -> [meta.species, meta, h5ad] }
        .combine(ch_vocab, by: 0)
        .combine(ch_species_file, by: 0)
        .map { species, meta, h5ad, vocab, species_file -> [meta, h5ad, vocab] }
    PREPROCESS(ch_preprocess_in)
    ch_versions = ch_versions.mix(PREPROCESS.out.versions.first())

    // by sample id: the vocabulary (INDEX) and the projected species file (MERGE)
    ch_sample_vocab = ch_preprocess_in.map { meta, h5ad, vocab -> [meta.id, vocab] }
    ch_sample_species = ch_samples
        .map { meta, h5ad -> [meta.species, meta.id] }
        .combine(ch_species_file, by: 0)
        .map { species, id, species_file -> [id, species_file] }

    ch_index_in = PREPROCESS.out.adata
        .map { meta, adata -> [meta.id, meta, adata] }
        .join(ch_sample_vocab)
        .map { id, meta, adata, vocab -> [meta, adata, vocab] }
    INDEX(ch_index_in)
    ch_versions = ch_versions.mix(INDEX.out.versions.first())

    SENTENCES(PREPROCESS.out.adata.join(INDEX.out.index))
    ch_versions = ch_versions.mix(SENTENCES.out.versions.first())

    //
    // EMBED: one task per shard; small datasets' single shards packed per species (--embed_pack_cells)
    //
    EMBED_SHARDS(SENTENCES.out.shards, ch_species_file, ch_samples, params.embed_pack_cells.toString().toLong())
    ch_versions = ch_versions.mix(EMBED_SHARDS.out.versions)
    ch_embeddings = EMBED_SHARDS.out.embeddings

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

    //
    // ATLAS over every dataset, in samplesheet order (stable task hash), when there are >= 2.
    //
    ch_order = ch_samplesheet.map { meta, h5ad -> meta.id }.toList().map { ids -> [order: ids] }
    ch_atlas_files = channel.value([])
    if (asBool(params.atlas)) {
        ch_atlas_in = MERGE.out.adata
            .toList()
            .map { rows -> [rows: rows] }
            .combine(ch_order)
            .filter { merged, sheet -> merged.rows.size() >= 2 }
            .map { merged, sheet ->
                def rows = merged.rows.sort(false) { r -> sheet.order.indexOf(r[0].id) }
                [[id: 'atlas'], rows.collect { r -> r[0].id }, rows.collect { r -> r[0].species }, rows.collect { r -> r[1] }]
            }
        ATLAS(ch_atlas_in)
        ch_versions = ch_versions.mix(ATLAS.out.versions)
        // REPORT needs the maps and numbers, not the atlas h5ad
        ch_atlas_files = ATLAS.out.summary
            .join(ATLAS.out.mqc)
            .map { meta, summary, mqc -> ([summary] + (mqc instanceof List ? mqc : [mqc])).sort(false) { f -> f.name } }
            .ifEmpty([])
            .first()
    }

    //
    // REPORT over the small per-sample summaries of MERGE (not the final h5ads), plus the atlas.
    //
    ch_report_in = MERGE.out.summary
        .flatMap { meta, files -> files }
        .collect(sort: { a, b -> a.name <=> b.name })
        .map { files -> [[id: 'report'], files] }
        .combine(ch_atlas_files.map { files -> [atlas: files] })
        .map { meta, files, atlas -> [meta, files, atlas.atlas] }
    REPORT(ch_report_in)
    ch_versions = ch_versions.mix(REPORT.out.versions)

    //
    // pipeline_info/software_versions.yml (also MultiQC's software versions section)
    //
    ch_collated_versions = softwareVersionsToYAML(ch_versions)
        .mix(channel.of(workflowVersionToYAML()))
        .collectFile(storeDir: "${params.outdir}/pipeline_info", name: 'software_versions.yml', sort: true, newLine: true)

    //
    // MULTIQC: our custom content (REPORT's table, ATLAS's maps and metrics) + software versions
    //
    ch_multiqc_report = channel.empty()
    if (!asBool(params.skip_multiqc)) {
        ch_multiqc_files = REPORT.out.mqc
            .flatMap { meta, files -> files instanceof List ? files : [files] }
            .mix(ch_atlas_files.flatMap { files -> files.findAll { f -> f.name.contains('_mqc.') } })
            .collect(sort: { a, b -> a.name <=> b.name })
        ch_multiqc_config = channel.value(file("${projectDir}/assets/multiqc_config.yml", checkIfExists: true))
        ch_multiqc_extra = channel.value(params.multiqc_config ? file(params.multiqc_config.toString(), checkIfExists: true) : [])
        ch_multiqc_in = ch_multiqc_files
            .map { files -> [files: files] }
            .combine(ch_collated_versions)
            .combine(ch_multiqc_config)
            .combine(ch_multiqc_extra.map { f -> [extra: f] })
            .map { files, versions, config, extra -> [[id: 'multiqc'], files.files, versions, config, extra.extra] }
        MULTIQC(ch_multiqc_in)
        ch_multiqc_report = MULTIQC.out.report
    }

    emit:
    adata    = MERGE.out.adata        // channel: [ meta, <sample>_uce_adata.h5ad ]
    report   = REPORT.out.report      // channel: [ meta, report/ ]
    multiqc  = ch_multiqc_report      // channel: [ meta, multiqc_report.html ]
    versions = ch_versions            // channel: versions.yml files
}

// Official file names of the per-species protein embeddings (as src/uce_nf/model_files.py).
def officialProteinEmbeddings() {
    return [
        human              : 'Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt',
        mouse              : 'Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt',
        frog               : 'Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt',
        zebrafish          : 'Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt',
        mouse_lemur        : 'Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt',
        pig                : 'Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt',
        macaca_fascicularis: 'Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt',
        macaca_mulatta     : 'Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt',
    ]
}

// [ meta, spec_chrom_csv, offset_pkl, token_file, protein_embedding_pt, other species' protein_embedding_pts ]
// of one species (meta.other_species: species -> file name of that list): --model_dir's
// official layout, or the per-file params. A missing file is one line here, before any task. The
// protein embeddings are found as the reference finds them (the official names, plus
// new_species_protein_embeddings.csv); [] for a species without any, which SPECIES_VOCAB reports.
def speciesFiles(species, dir) {
    def stub   = workflow.stubRun
    def csv    = modelFile('spec_chrom_csv', 'species_chrom.csv', dir)
    def pkl    = modelFile('offset_pkl', 'species_offsets.pkl', dir)
    def tokens = modelFile('token_file', 'all_tokens.torch', dir)
    def pe_dir = params.protein_embeddings_dir ? file(params.protein_embeddings_dir.toString()) : dir.resolve('protein_embeddings')
    def names  = officialProteinEmbeddings()
    def extra  = dir.resolve('new_species_protein_embeddings.csv')
    if (extra.exists()) {
        extra.readLines().drop(1).findAll { l -> l.trim() }.each { l ->
            def cols = l.split(',', 2)
            names[cols[0].trim()] = cols[1].trim()
        }
    }
    def found = names.collectEntries { sp, name -> [sp, name.startsWith('/') ? file(name) : pe_dir.resolve(name)] }
    def pe = []
    if (names[species]) {
        if (found[species].exists()) {
            pe = found[species]
        } else if (!stub) {
            error("--model_dir ${dir.toUriString()}: protein embeddings of '${species}' not found (${found[species].toUriString()}); download the official model files (--download_model_files) or pass --protein_embeddings_dir")
        }
    }
    // The other species' files prove where the gene blocks of a replaced token file end (only their
    // sizes are read, and only then). Not staged when --chrom_token_offset states it, nor for a token
    // file of at least the official 143,574 x 5,120 float32 (the checkpoint's table; the offset is then
    // the reference default, and a bigger replaced file without the files asks for the offset).
    def official = tokens.exists() && tokens.size() >= 143574L * 5120L * 4L
    def others = (params.chrom_token_offset != null || official) ? [:] : found.findAll { sp, f -> sp != species && f.exists() }
    return [[id: species, species: species, other_species: others.collectEntries { sp, f -> [sp, f.name] }], csv, pkl, tokens, pe, others.values() as List]
}

// One model file: the per-file param when set, else <model_dir>/<name>; missing is one line, now.
def modelFile(key, name, dir) {
    def f = params[key] ? file(params[key].toString()) : dir.resolve(name)
    if (!workflow.stubRun && !f.exists()) {
        error("${params[key] ? '--' + key : '--model_dir ' + dir.toUriString()}: ${name} not found (${f.toUriString()}); download the official model files (--download_model_files) or pass --${key}")
    }
    return f
}

// Every dataset's VALIDATE result: errors, one line per bad dataset in samplesheet order,
// "VALIDATE: sample 'id' (<samplesheet path>): <what, how to fix>", with the tasks' staged names
// (input/x.h5ad, model/offsets/species_offsets.pkl, ...) put back to the user's paths; and the
// merged JSON. No errors for a stub run's placeholder JSON.
def validationSummary(results, rows, species_files) {
    def slurper = new groovy.json.JsonSlurper()
    def parsed = new TreeMap(results.collectEntries { id, json -> [id, slurper.parseText(json.text)] })
    def errors = rows.findAll { meta, h5ad -> parsed[meta.id] instanceof Map && parsed[meta.id].error }.collect { meta, h5ad ->
        def r = parsed[meta.id]
        def user = h5ad instanceof java.nio.file.Path ? h5ad.toUriString() : h5ad.toString()
        def msg = r.error.toString()
        def input = r.input?.toString()
        if (input && msg.startsWith(input + ': ')) {
            msg = msg.substring(input.length() + 2)   // the line names the file already
        }
        if (input) {
            msg = msg.replace(input, user)
        }
        def files = species_files[meta.species] ?: []
        ['model/chrom', 'model/offsets', 'model/tokens', 'model/protein'].eachWithIndex { dir, i ->
            def real = files[i]
            if (real) {
                def to = java.util.regex.Matcher.quoteReplacement(real.toUriString())
                msg = msg.replaceAll('(?<![\\w./-])' + java.util.regex.Pattern.quote("${dir}/${real.name}".toString()) + '(?![\\w.-])', to)
            }
        }
        "VALIDATE: sample '${meta.id}' (${user}): ${msg}".toString()
    }
    return [errors: errors, json: groovy.json.JsonOutput.prettyPrint(groovy.json.JsonOutput.toJson(parsed)) + '\n']
}

// pipeline_info/validated.json (per sample: its checks, or its error) and samplesheet.valid.csv
// (the samplesheet as checked, with resolved paths), written before the run continues or stops.
def writeValidation(summary, rows) {
    def dir = file("${params.outdir}/pipeline_info")
    dir.mkdirs()
    def optional = ['gene_column', 'counts_layer'].findAll { c -> rows.any { r -> r[0][c] } }
    def lines = [(['sample', 'h5ad', 'species'] + optional).join(',')]
    rows.each { meta, h5ad ->
        def path = h5ad instanceof java.nio.file.Path ? h5ad.toUriString() : h5ad.toString()
        lines << ([meta.id, path, meta.species] + optional.collect { c -> meta[c] ?: '' }).collect { v -> csvField(v) }.join(',')
    }
    dir.resolve('validated.json').text = summary.json
    dir.resolve('samplesheet.valid.csv').text = lines.join('\n') + '\n'
}

// Quotes a CSV field when it needs it (RFC 4180).
def csvField(v) {
    def s = v == null ? '' : v.toString()
    return (s.contains(',') || s.contains('"')) ? '"' + s.replace('"', '""') + '"' : s
}
