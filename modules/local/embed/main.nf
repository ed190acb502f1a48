// Transformer forward pass over one shard of sentences (GPU when available, else CPU), or over a
// pack of small datasets' shards of one species (meta.shards: one meta per shard, in the order of
// the sentences files), which then share one start-up: imports, species file, model, CUDA context.
process EMBED {
    tag "${meta.shards ? "${meta.id} (${meta.shards.size()} datasets)" : meta.id}"
    label 'process_gpu'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // The species file holds everything EMBED needs: this model's projected token table and its
    // weights without the ~3 GB token table, so no checkpoint is staged (or downloaded) per task.
    tuple val(meta), path(sentences), path(species_file)

    output:
    // one <shard id>.embeddings.npz per shard, named as an unpacked task names it
    tuple val(meta), path("*.embeddings.npz"), emit: embeddings
    path 'versions.yml'                      , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def files  = sentences instanceof List ? sentences : [sentences]
    def names  = meta.shards ? meta.shards.collect { m -> m.id } : [task.ext.prefix ?: "${meta.id}"]
    def shards = [files, names].transpose().collect { p -> "--sentences ${p[0]} --output ${p[1]}.embeddings.npz" }.join(' \\\n        ')
    // CPU threads follow the task's allocation, not the host's core count.
    """
    export OMP_NUM_THREADS=${task.cpus}
    export MKL_NUM_THREADS=${task.cpus}

    uce-embed \\
        ${shards} \\
        --species-file ${species_file} \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        torch: \$(python3 -c 'import torch; print(torch.__version__)')
    END_VERSIONS
    """

    stub:
    def names = meta.shards ? meta.shards.collect { m -> m.id } : [task.ext.prefix ?: "${meta.id}"]
    """
    touch ${names.collect { n -> "${n}.embeddings.npz" }.join(' ')}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
