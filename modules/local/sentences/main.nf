// Seeded cell-sentence sampling for one dataset, written as shards of at most shard_size
// cells (--shard-size in ext.args), with <prefix>.shards.json ({shard file: cells}). Each shard
// becomes its own EMBED task, or, for a small dataset, part of a pack (--embed_pack_cells).
process SENTENCES {
    tag "${meta.id}"
    label 'process_medium'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    tuple val(meta), path(adata), path(index)

    output:
    tuple val(meta), path("sentences/*.sentences.npz"), path("sentences/*.shards.json"), emit: shards
    path 'versions.yml'                               , emit: versions

    script:
    def args   = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    // --workers only changes speed, never the sentences (the sampler is seeded per cell/batch)
    """
    uce-sentences \\
        --adata ${adata} \\
        --index ${index} \\
        ${args} \\
        --workers ${task.cpus} \\
        --output-dir sentences \\
        --name ${prefix}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
        numpy: \$(python3 -c 'import numpy; print(numpy.__version__)')
    END_VERSIONS
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    // Two shards of 10 cells, so a stub run exercises the per-shard fan-out and the regrouping;
    // ext.stub_shards (a test config) sets another count, e.g. 1: a small dataset, packed.
    def names  = (0..<(task.ext.stub_shards ?: 2)).collect { k -> "${prefix}.shard-${String.format('%05d', k)}.sentences.npz" }
    def cells  = names.collect { n -> '"' + n + '": 10' }.join(', ')
    """
    mkdir -p sentences
    touch ${names.collect { n -> "sentences/${n}" }.join(' ')}
    echo '{${cells}}' > sentences/${prefix}.shards.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}
