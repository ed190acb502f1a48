/*
 * Test harness: runs stand-ins of the pipeline's processes under the pipeline's own config
 *   nextflow run tests/nextflow/config_probe.nf -c nextflow.config --outdir out [--retry_codes 143,130]
 * SPECIES_VOCAB prints its ext.args (conf/modules.config) as `ARGS <name> <args>`.
 * With --retry_codes, RETRY fails once with each code, then succeeds (its errorStrategy is
 * conf/base.config's); LAST then fails once with exit 1, which must not be retried.
 * Read the attempts from the trace file in <outdir>/pipeline_info.
 */

params.retry_codes = null

process SPECIES_VOCAB {
    input:
    val(name)

    output:
    stdout

    script:
    "echo 'ARGS ${name} ${task.ext.args ?: ''}'"
}

process RETRY {
    tag "${code}"

    input:
    val(code)

    output:
    val(code)

    script:
    "exit ${task.attempt == 1 ? code : 0}"
}

process LAST {
    input:
    val(codes)

    script:
    "exit 1"
}

workflow {
    main:
    SPECIES_VOCAB(channel.of('human')).view { s -> s.trim() }
    if (params.retry_codes) {
        RETRY(channel.fromList(params.retry_codes.toString().tokenize(',')))
        LAST(RETRY.out.collect())
    }
}
