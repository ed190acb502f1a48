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
include { paramsHelp; asBool      } from './subworkflows/local/utils_params'

workflow {

    main:
    if (asBool(params.help)) {
        log.info(paramsHelp("${projectDir}/nextflow_schema.json"))
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
        params.input
    )

    PIPELINE_COMPLETION(params.outdir)
}
