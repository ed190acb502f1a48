// Transformer forward pass over one shard of sentences (GPU when available, else CPU).
process EMBED {
    tag "${meta.id}"
    label 'process_gpu'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // The species file holds everything EMBED needs: this model's projected token table and its
    // weights without the ~3 GB token table, so no checkpoint is staged (or downloaded) per task.
    tuple val(meta), path(sentences), path(species_file)

    output:
    tuple val(meta), path("*.embeddings.npz"), emit: embeddings
    path 'versions.yml'                      , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    // CPU threads follow the task's allocation, not the host's core count.
    """
    export OMP_NUM_THREADS=${task.cpus}
    export MKL_NUM_THREADS=${task.cpus}

    uce-embed \\
        --sentences ${sentences} \\
        --species-file ${species_file} \\
        ${args} \\
        --output ${prefix}.embeddings.npz

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
    touch ${prefix}.embeddings.npz

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
