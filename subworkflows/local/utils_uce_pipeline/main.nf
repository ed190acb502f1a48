/*
========================================================================================
    Pipeline start and end: params checks, params dump, samplesheet channel,
    software versions, completion summary.
========================================================================================
*/

include { validateParameters; asBool } from '../utils_params'
include { parseSamplesheet           } from '../utils_samplesheet'

workflow PIPELINE_INITIALISATION {

    take:
    validate_params // boolean: validate params against nextflow_schema.json
    input           // string : path to the samplesheet
    outdir          // string : output folder

    main:
    if (asBool(validate_params)) {
        validateParameters("${projectDir}/nextflow_schema.json", params)
    }
    dumpParametersToJSON(outdir)
    // Parsed now, while the workflow is built: a bad row fails before any task runs.
    def rows = parseSamplesheet(input)
    ch_samplesheet = channel.fromList(rows)

    emit:
    samplesheet = ch_samplesheet // channel: [ meta, h5ad ]
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
