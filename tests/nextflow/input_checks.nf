/*
 * Test harness: runs the pipeline's samplesheet parser and params validator over many cases
 * in one Nextflow launch (a launch costs ~10 s of JVM start-up on the CI machine).
 *   nextflow run tests/nextflow/input_checks.nf --cases cases.json
 * cases.json: {"schema": path, "samplesheets": {name: path}, "params": {name: {param: value}},
 *              "help": {name: param}}   (help: optional, the text of --help <param>)
 * Prints one line per case: `CASE <name> OK` or `CASE <name> ERROR <message>`; a message of
 * several lines (every invalid param of a set) has them joined by ' || '.
 */

include { parseSamplesheet   } from '../../subworkflows/local/utils_samplesheet'
include { validateParameters; paramHelp } from '../../subworkflows/local/utils_params'

workflow {
    main:
    def cases = new groovy.json.JsonSlurper().parseText(file(params.cases).text)
    cases.samplesheets.each { name, path ->
        try {
            def rows = parseSamplesheet(path)
            println("CASE ${name} OK ${rows.size()}")
        } catch (Exception e) {
            println("CASE ${name} ERROR ${rootMessage(e)}")
        }
    }
    cases.params.each { name, values ->
        try {
            validateParameters(cases.schema, values)
            println("CASE ${name} OK")
        } catch (Exception e) {
            println("CASE ${name} ERROR ${rootMessage(e)}")
        }
    }
    (cases.help ?: [:]).each { name, param ->
        def text = paramHelp(cases.schema, param)
        println("CASE ${name} HELP ${text == null ? 'null' : text.trim().replace('\n', ' || ')}")
    }
}

// Functions are invoked reflectively: the pipeline's error is the innermost cause.
def rootMessage(e) {
    return e.getCause() ? rootMessage(e.getCause()) : e.getMessage().replace('\n', ' || ')
}
