// Checks the whole samplesheet against the model files before any heavy task runs: species
// known to species_offsets.pkl and species_chrom.csv, protein embeddings present, every
// h5ad readable with usable gene names and counts, not emptied by the filter (ext.args:
// --min-cells/--min-genes/--no-filter). Every other process waits for it.
// A bad dataset does not fail this task: its one-line error goes into validated.json
// ({sample: {"error": ..., "input": staged path}}) and the workflow stops the run with one line
// per bad dataset, naming the sample and the samplesheet's path (which this task never sees).
// Only a crash of the checks themselves fails the task.
process VALIDATE {
    tag "${meta.id}"
    label 'process_single'
    // container: process.container (nextflow.config), from params.container_registry/container_image

    input:
    // samples: one meta map per samplesheet row; h5ads: their files in the same order. Each
    // file gets its own folder (inputs/1/, inputs/2/, ...), so equal base names never clash.
    // A dataset may be a folder (AnnData .zarr, Cell Ranger mtx): path inputs stage it as one.
    tuple val(meta), val(samples), path(h5ads, stageAs: 'inputs/?/*')
    tuple path(model_dir, stageAs: 'model_files'), path(checkpoint, stageAs: 'checkpoint/*'), path(spec_chrom_csv, stageAs: 'overrides/chrom/*'), path(offset_pkl, stageAs: 'overrides/offsets/*'), path(token_file, stageAs: 'overrides/tokens/*'), path(protein_embeddings_dir, stageAs: 'overrides/protein/*')

    output:
    tuple val(meta), path('validated.json')        , emit: json
    tuple val(meta), path('samplesheet.valid.csv') , emit: samplesheet
    path 'versions.yml'                            , emit: versions

    script:
    def args      = task.ext.args ?: ''
    def files     = h5ads instanceof List ? h5ads : [h5ads]
    def optional  = ['gene_column', 'counts_layer'].findAll { c -> samples.any { m -> m[c] } }
    def header    = (['sample', 'h5ad', 'species'] + optional).join(',')
    // Staged paths are relative to the task dir, which is where the samplesheet is written:
    // relative h5ad paths resolve against the samplesheet's folder (same rule as the pipeline).
    def pairs     = [samples, files].transpose()
    def csv_rows  = pairs.collect { m, f ->
        ([m.id, f.toString(), m.species] + optional.collect { c -> m[c] ?: '' }).collect { v -> csvField(v) }.join(',')
    }
    // '|'-separated copy for the shell loop (not tabs: read would merge empty fields).
    def tsv_rows  = pairs.collect { m, f -> [m.id, f.toString(), m.species, m.gene_column ?: '', m.counts_layer ?: ''].join('|') }
    def overrides = modelOverrides(spec_chrom_csv, offset_pkl, token_file, protein_embeddings_dir)
    // `uce validate` checks one dataset (and the model files for its species) in seconds.
    // Every dataset is checked, then all problems are reported together.
    """
    cat <<'END_SAMPLESHEET' > samplesheet.valid.csv
    ${header}
    ${csv_rows.join('\n    ')}
    END_SAMPLESHEET
    printf '%s\\n' ${tsv_rows.collect { r -> "'" + r + "'" }.join(' ')} > samples.txt

    mkdir -p validated
    while IFS='|' read -r sample h5ad species gene layer; do
        # exit 2 = a problem with the inputs, recorded in the sample's JSON; any other failure is a
        # crash of the checks and fails the task with its log
        rc=0
        uce-validate \
            --input "\$h5ad" \
            --species "\$species" \
            \${gene:+--gene-column "\$gene"} \
            \${layer:+--counts-layer "\$layer"} \
            --model-dir model_files \
            --model ${checkpoint} \
            ${overrides} \
            ${args} \
            --output "validated/\$sample.json" 2> "validated/\$sample.log" || rc=\$?
        if [ "\$rc" -eq 2 ] && [ -s "validated/\$sample.json" ]; then
            echo "VALIDATE: sample '\$sample': \$(grep -m1 '^ERROR' "validated/\$sample.log" || true)" >&2
        elif [ "\$rc" -ne 0 ]; then
            cat "validated/\$sample.log" >&2
            exit "\$rc"
        fi
    done < samples.txt

    # One JSON keyed by sample id (failed samples: {"error": ..., "input": ...})
    python3 - <<'END_PYTHON'
    import json, pathlib
    out = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path("validated").glob("*.json"))}
    pathlib.Path("validated.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\\n")
    END_PYTHON

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)')
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """

    stub:
    def files    = h5ads instanceof List ? h5ads : [h5ads]
    def csv_rows = [samples, files].transpose().collect { m, f -> [m.id, f.toString(), m.species].collect { v -> csvField(v) }.join(',') }
    """
    cat <<'END_SAMPLESHEET' > samplesheet.valid.csv
    sample,h5ad,species
    ${csv_rows.join('\n    ')}
    END_SAMPLESHEET
    echo '{"stub": true}' > validated.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        uce-nf: \$(python3 -c 'import uce_nf; print(uce_nf.__version__)' 2>/dev/null || echo stub)
        python: \$(python3 --version | sed 's/Python //')
    END_VERSIONS
    """
}

// Quotes a CSV field when it needs it (RFC 4180).
def csvField(v) {
    def s = v == null ? '' : v.toString()
    return (s.contains(',') || s.contains('"')) ? '"' + s.replace('"', '""') + '"' : s
}

// Command-line flags for the model-file overrides that were given (empty inputs are []).
def modelOverrides(spec_chrom_csv, offset_pkl, token_file, protein_embeddings_dir) {
    return [
        spec_chrom_csv         ? "--spec-chrom-csv ${spec_chrom_csv}"                 : '',
        offset_pkl             ? "--offset-pkl ${offset_pkl}"                         : '',
        token_file             ? "--token-file ${token_file}"                         : '',
        protein_embeddings_dir ? "--protein-embeddings-dir ${protein_embeddings_dir}" : '',
    ].findAll { f -> f }.join(' ')
}
