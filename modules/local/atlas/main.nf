// One atlas over every dataset of the run (uce atlas, src/uce_nf/atlas.py): the embedded cells of
// all datasets in samplesheet order with obs sample/species/uce_embedded and the obs columns
// asked for, obsm X_uce and X_umap, obs leiden (cosine neighbours, seeded), label transfer from
// the reference samples, integration metrics, and PNG maps + a metrics table for the report and
// MultiQC. Runs when the run has >= 2 datasets and --atlas is true (workflows/uce.nf).
process ATLAS {
    tag "${meta.id}"
    label 'process_medium'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // samples, species: lists in samplesheet order, one entry per file of adatas (same order)
    tuple val(meta), val(samples), val(species), path(adatas, stageAs: 'adata/*')

    output:
    tuple val(meta), path('atlas')                     , emit: atlas
    tuple val(meta), path('atlas/uce_atlas.h5ad')      , emit: h5ad
    tuple val(meta), path('atlas/atlas_summary.json')  , emit: summary
    tuple val(meta), path('atlas/*_mqc.{png,tsv}')     , emit: mqc
    path 'versions.yml'                                , emit: versions

    script:
    def args  = task.ext.args ?: ''
    def files = adatas instanceof List ? adatas : [adatas]
    def inputs = [files, samples, species].transpose().collect { f, s, sp -> "--adata ${f} --sample '${s}' --species '${sp}'" }.join(' \\\n        ')
    """
    uce-atlas \\
        ${inputs} \\
        ${args} \\
        --output-dir atlas

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        scanpy: \$(python3 -c 'import scanpy; print(scanpy.__version__)')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p atlas
    touch atlas/uce_atlas.h5ad
    echo '{}' > atlas/atlas_summary.json
    for p in sample species label leiden; do touch atlas/atlas_umap_\${p}_mqc.png; done
    printf 'Sample\\tn_cells\\n' > atlas/atlas_metrics_mqc.tsv

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
