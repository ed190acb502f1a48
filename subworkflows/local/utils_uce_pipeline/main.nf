/*
========================================================================================
    Pipeline start and end: params checks, params dump, samplesheet channel,
    software versions, completion summary.
========================================================================================
*/

include { paramErrors; schemaParams; asBool; referenceSampleError } from '../utils_params'
include { parseSamplesheet                    } from '../utils_samplesheet'
include { parseSpeciesSheet                   } from '../utils_species_sheet'

workflow PIPELINE_INITIALISATION {

    take:
    validate_params // boolean: validate params against nextflow_schema.json
    input           // string : path to the samplesheet
    outdir          // string : output folder

    main:
    // A failed check leaves the outdir as it was: no params json, and the trace file that
    // Nextflow created at launch is removed again.
    if (asBool(validate_params)) {
        def errors = paramErrors("${projectDir}/nextflow_schema.json", params, workflow.commandLine)
        if (errors) {
            removeLaunchFiles(outdir)
            error(errors.collect { e -> "Invalid parameter: ${e}" }.join('\n'))
        }
    }
    // Parsed now, while the workflow is built: a bad row fails before any task runs.
    def rows = []
    def species_rows = []
    try {
        rows = parseSamplesheet(input)
        species_rows = parseSpeciesSheet(params.species_sheet)
        checkEsmModel(species_rows)
    } catch (Exception e) {
        removeLaunchFiles(outdir)
        throw e
    }
    // Params that name samples are checked against the samplesheet once it is read
    def sample_ids = rows.collect { r -> r[0].id }
    def ref_error = referenceSampleError(params.reference_samples, sample_ids)
    if (ref_error && asBool(params.validate_params)) {
        removeLaunchFiles(outdir)
        error("Invalid parameter: ${ref_error}")
    }
    checkPreviousRun(outdir, rows)
    dumpParametersToJSON(outdir)
    ch_samplesheet = channel.fromList(rows)
    ch_species_sheet = channel.fromList(species_rows)

    emit:
    samplesheet   = ch_samplesheet   // channel: [ meta, h5ad ]
    species_sheet = ch_species_sheet // channel: [ meta, fasta, protein_embeddings or [] ] (--species_sheet)
}

// --esm_model: needed (a local Hugging Face EsmModel folder) when a species-sheet row has no
// protein_embeddings; one line otherwise. A run never downloads a model.
def checkEsmModel(species_rows) {
    def need = species_rows.findAll { r -> !r[2] }.collect { r -> r[0].species }
    if (!need) {
        return
    }
    if (!params.esm_model || params.esm_model instanceof Boolean) {
        error("Invalid parameter: --esm_model is required: species ${need.join(', ')} of --species_sheet have no protein_embeddings, so their genes are embedded with ESM2; pass --esm_model <local Hugging Face EsmModel folder> (e.g. esm2_t48_15B_UR50D), or give protein_embeddings in the sheet")
    }
    def dir = file(params.esm_model.toString())
    if (dir.toUri().getScheme() == 'file' && !dir.resolve('config.json').exists()) {
        error("Invalid parameter: --esm_model ${dir}: ${dir.exists() ? 'no config.json in it' : 'not found'}; pass a local Hugging Face EsmModel folder (config.json, weights, vocab.txt)")
    }
}

workflow PIPELINE_COMPLETION {

    take:
    outdir // string: output folder

    main:
    // Handlers call functions: inside the handler closures `workflow` is not in scope.
    workflow.onComplete {
        completionSummary(outdir)
    }
    workflow.onError {
        errorSummary()
    }
}

def completionSummary(outdir) {
    def name = workflow.manifest.name
    if (workflow.success) {
        log.info("[${name}] done: ${workflow.stats.succeedCount} task(s) run, ${workflow.stats.cachedCount} cached; results in ${outdir}")
    } else {
        log.error("[${name}] failed; reports in ${outdir}/pipeline_info/")
    }
}

def errorSummary() {
    log.error("[${workflow.manifest.name}] ${workflow.errorMessage ?: 'stopped with an error'}")
}

// params_<timestamp>.json in pipeline_info, as nf-core does (timestamp shared with the
// execution reports through params.trace_report_suffix).
def dumpParametersToJSON(outdir) {
    def info = file("${outdir}/pipeline_info")
    info.mkdirs()
    def plain = params.collectEntries { k, v -> [k, v instanceof Boolean || v instanceof Number || v == null ? v : v.toString()] }
    info.resolve("params_${params.trace_report_suffix}.json").text = new groovy.json.JsonBuilder(plain).toPrettyString() + '\n'
}

// Files of this launch: the trace observer creates execution_trace_<suffix>.txt (and the
// folders above it) when the run starts, before any check; report, timeline and DAG are
// written only at the end of a run that got past building the workflow.
def removeLaunchFiles(outdir) {
    def info = file("${outdir}/pipeline_info")
    if (!info.isDirectory()) {
        return
    }
    def tag = "_${params.trace_report_suffix}."
    info.listFiles().findAll { f -> f.isFile() && f.name.contains(tag) }.each { f -> f.delete() }
    // Folders that are empty now were created by this launch (an empty outdir that existed
    // before is removed too: it cannot be told apart, and held nothing).
    if (!info.list()) {
        info.delete()
        def out = file(outdir.toString())
        if (out.isDirectory() && !out.list()) {
            out.delete()
        }
    }
}

// A param value as the params json stores it (CLI strings and typed config values compare equal)
def shownValue(v) {
    return v == null ? 'null' : v.toString()
}

// Params that do not change what a run writes into the outdir.
def outputNeutralParams() {
    return ['help', 'validate_params', 'trace_report_suffix', 'outdir', 'publish_dir_mode', 'save_intermediates',
            'slurm_queue', 'slurm_cluster_options', 'awsbatch_queue', 'aws_region', 'awsbatch_cli_path',
            'awsbatch_workdir', 'google_project', 'google_location', 'google_workdir', 'google_spot',
            'k8s_namespace', 'k8s_storage_claim', 'k8s_storage_mount']
}

// Re-running into an outdir that holds results of other parameters replaces them without a
// trace: warn, naming what changes and which files are replaced or stay behind, and move the
// earlier run's pipeline_info files into pipeline_info/previous_<its suffix>/ so that
// pipeline_info/ describes one configuration. A re-run with the same parameters (-resume)
// writes the same results: nothing to say, and the reports of both runs stay side by side.
def checkPreviousRun(outdir, rows) {
    def out = file(outdir.toString())
    def info = out.resolve('pipeline_info')
    def suffix = params.trace_report_suffix.toString()
    def mine = "_${suffix}."
    def old_files = info.isDirectory() ? info.listFiles().findAll { f -> f.isFile() && !f.name.contains(mine) } : []
    def old_params = old_files.findAll { f -> f.name ==~ /^params_.+\.json$/ }.sort(false) { f -> f.lastModified() }
    def replaced = []
    rows.collect { r -> r[0].id }.each { id ->
        ["${id}/${id}_uce_adata.h5ad", "${id}/${id}.preprocess.json"].each { rel ->
            if (out.resolve(rel).exists()) {
                replaced << rel
            }
        }
        if (asBool(params.save_intermediates) && out.resolve("${id}/intermediates").exists()) {
            replaced << "${id}/intermediates/"
        }
    }
    ['report', 'atlas', 'multiqc'].each { d ->
        if (out.resolve(d).exists()) {
            replaced << "${d}/".toString()
        }
    }
    if (!old_params && !replaced) {
        return
    }
    def prev_suffix = null
    def changes = []
    if (old_params) {
        def last = old_params[-1]
        prev_suffix = last.name.replaceFirst(/^params_/, '').replaceFirst(/\.json$/, '')
        def before = [:]
        try {
            before = new groovy.json.JsonSlurper().parseText(last.text)
        } catch (Exception e) {
            before = [:]
        }
        def neutral = outputNeutralParams()
        schemaParams("${projectDir}/nextflow_schema.json").keySet().findAll { k -> !(k in neutral) }.each { k ->
            if (shownValue(before[k]) != shownValue(params[k])) {
                changes << "${k} ${shownValue(before[k])} (now ${shownValue(params[k])})"
            }
        }
        if (!changes) {
            return
        }
    } else {
        // results without a params json: an older or interrupted run of unknown parameters
        prev_suffix = new java.text.SimpleDateFormat('yyyy-MM-dd_HH-mm-ss').format(new Date(([out.resolve(replaced[0])] + old_files).collect { f -> f.lastModified() }.max()))
    }
    // Earlier results that this run does not rewrite (other samples, intermediates)
    def ids = rows.collect { r -> r[0].id }
    def kept = out.listFiles().findAll { f -> !(f.name in ['pipeline_info', 'report', 'atlas', 'multiqc', 'model_files']) && !(f.name in ids) }.collect { f -> f.isDirectory() ? "${f.name}/" : f.name }
    if (!asBool(params.save_intermediates)) {
        kept += ids.findAll { id -> out.resolve("${id}/intermediates").exists() }.collect { id -> "${id}/intermediates/" }
    }
    def dest = info.resolve("previous_${prev_suffix}")
    def moved = []
    if (old_files) {
        dest.mkdirs()
        old_files.each { f ->
            f.moveTo(dest.resolve(f.name))
            moved << f.name
        }
    }
    def lines = [
        old_params
            ? "--outdir ${outdir}: results there come from an earlier run (${prev_suffix}) with other parameters: ${changes.join(', ')}."
            : "--outdir ${outdir}: results there come from an earlier run whose parameters are unknown (no pipeline_info/params_*.json).",
        "This run (${suffix}) replaces: ${replaced ? replaced.join(', ') : 'nothing yet (no results of these samples there)'}."
    ]
    if (kept) {
        lines << "Kept from the earlier run, not rewritten by this one: ${kept.sort(false).join(', ')}."
    }
    if (moved) {
        lines << "The earlier run's pipeline_info files (${moved.sort(false).join(', ')}) are moved to pipeline_info/previous_${prev_suffix}/."
    }
    log.warn(lines.join('\n'))
}

// One versions.yml ("PROCESS": {tool: version}) -> YAML keyed by the simple process name.
def processVersionsFromYAML(yaml_file) {
    def yaml = new org.yaml.snakeyaml.Yaml()
    def versions = yaml.load(yaml_file.text).collectEntries { k, v -> [k.toString().tokenize(':')[-1], v] }
    return yaml.dumpAsMap(versions).trim()
}

def workflowVersionToYAML() {
    // Plain Strings only: collectFile cannot serialise the VersionNumber of a GString
    def versions = [Workflow: [(workflow.manifest.name.toString()): workflow.manifest.version.toString(), Nextflow: workflow.nextflow.version.toString()]]
    return new org.yaml.snakeyaml.Yaml().dumpAsMap(versions).trim()
}

// Channel of YAML snippets, one per distinct process (add workflowVersionToYAML() to it).
def softwareVersionsToYAML(ch_versions) {
    return ch_versions
        .unique()
        .map { f -> processVersionsFromYAML(f) }
        .unique()
}
