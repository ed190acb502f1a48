#!/usr/bin/env nextflow
/*
========================================================================================
    uce-nf: Universal Cell Embeddings for single-cell datasets
========================================================================================
    Docs: docs/usage.md, docs/output.md.  Help: nextflow run . --help
----------------------------------------------------------------------------------------
*/

include { UCE                     } from './workflows/uce'
include { PIPELINE_INITIALISATION } from './subworkflows/local/utils_uce_pipeline'
include { PIPELINE_COMPLETION     } from './subworkflows/local/utils_uce_pipeline'
include { paramsHelp; paramHelp; unknownHelpError } from './subworkflows/local/utils_params'

workflow {

    main:
    // --help: every param; --help <param>: that one. Both exit before any check or task
    // (nextflow.config turns the reports off for them).
    def help = params.help == null ? 'false' : params.help.toString().trim()
    if (help && help.toLowerCase() != 'false') {
        def schema = "${projectDir}/nextflow_schema.json"
        if (help.toLowerCase() == 'true') {
            log.info(paramsHelp(schema))
        } else {
            def text = paramHelp(schema, help.replaceFirst(/^--/, ''))
            if (text == null) {
                error(unknownHelpError(schema, help.replaceFirst(/^--/, '')))
            }
            log.info(text)
        }
        System.exit(0)
    }

    // Params checks, params dump, samplesheet -> channel [ meta, h5ad ]
    PIPELINE_INITIALISATION(
        params.validate_params,
        params.input,
        params.outdir
    )

    UCE(
        PIPELINE_INITIALISATION.out.samplesheet,
        params.input,
        PIPELINE_INITIALISATION.out.species_sheet
    )

    PIPELINE_COMPLETION(params.outdir)
}
