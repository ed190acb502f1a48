// The per-checkpoint half of a species file: the vocabulary's tokens projected by this checkpoint,
// plus the checkpoint's weights without the token table and training heads (all EMBED needs).
// Runs once per (species, checkpoint); the only task that --model changes before EMBED.
process PREPARE_SPECIES {
    tag "${meta.id}"
    label 'process_medium'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // The species' vocabulary (SPECIES_VOCAB) and the checkpoint: the only task that stages it.
    tuple val(meta), path(vocab), path(checkpoint, stageAs: 'checkpoint/*')

    output:
    tuple val(meta), path("*.species.pt"), emit: species
    path 'versions.yml'                  , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    uce-prepare-species \\
        --species ${meta.species} \\
        --vocab ${vocab} \\
        --model ${checkpoint} \\
        ${args} \\
        --output ${prefix}.species.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}.species.pt

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
