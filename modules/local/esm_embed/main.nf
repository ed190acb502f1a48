// ESM2 embeddings of one chunk of a new species' proteins: the mean of the last layer over the
// residues (fair-esm extract.py --include mean --truncate). One chunk per task, so -resume redoes
// only unfinished chunks. GPU selection as EMBED's (ext.args: --device, --gpu-lock-dir).
process ESM_EMBED {
    tag "${meta.id}"
    label 'process_gpu'

    input:
    tuple val(meta), path(proteins)
    tuple path(esm_model, stageAs: 'esm_model'), path(checkpoint, stageAs: 'checkpoint/*')

    output:
    tuple val(meta), path("*.esm.pt"), emit: embeddings
    path 'versions.yml'              , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    uce-esm-embed \\
        --proteins ${proteins} \\
        --esm-model esm_model \\
        --checkpoint ${checkpoint} \\
        ${args} \\
        --output ${prefix}.esm.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
        transformers: \$(python3 -c 'import transformers; print(transformers.__version__)')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.esm.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: stub
    END_VERSIONS
    """
}
