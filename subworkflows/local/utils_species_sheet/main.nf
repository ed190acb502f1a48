/*
========================================================================================
    --species_sheet parsing (issue 13), in plain Groovy like the samplesheet's.
========================================================================================
    CSV with a header. Required columns: species, fasta, taxonomy_id. Optional:
    protein_embeddings (a precomputed gene -> embedding .pt; the ESM2 step is then skipped,
    the FASTA still gives the chromosome table). Paths: absolute, remote, or relative to the
    sheet's folder. Each row becomes a species the samplesheet's species column may name next
    to the 8 built-in ones. Every error is one line (file, line, what, how to fix), raised while
    the workflow is built, before any task runs.
----------------------------------------------------------------------------------------
*/

include { splitCsvLine; resolveH5ad; isLocal } from '../utils_samplesheet'

// The species of the official species_offsets.pkl (src/uce_nf/model_files.py
// PROTEIN_EMBEDDING_FILES; a test keeps the two lists equal).
def builtinSpecies() {
    return ['human', 'mouse', 'frog', 'zebrafish', 'mouse_lemur', 'pig', 'macaca_fascicularis', 'macaca_mulatta']
}

def speciesSheetError(sheet, line_no, msg) {
    error("Species sheet error: ${sheet} line ${line_no}: ${msg}")
}

// `Gallus_gallus.bGalGal1.mat.broiler.GRCg7b` of `...GRCg7b.pep.all.fa.gz` (as uce_nf.proteome.fasta_prefix)
def fastaPrefix(name) {
    def n = name
    ['.gz', '.fa', '.fasta', '.pep.all'].each { s -> n = n.endsWith(s) ? n.substring(0, n.size() - s.size()) : n }
    return n
}

// Returns [[meta, fasta, protein_embeddings or []], ...] in sheet order (empty without a sheet);
// meta = [id: species, species, taxonomy_id, gene_embeddings_file, precomputed].
def parseSpeciesSheet(sheet_path) {
    if (!sheet_path || sheet_path instanceof Boolean) {
        return []
    }
    def sheet = file(sheet_path.toString())
    if (!sheet.exists()) {
        error("Species sheet error: ${sheet}: file not found; pass --species_sheet <species.csv> (species,fasta,taxonomy_id)")
    }
    def required = ['species', 'fasta', 'taxonomy_id']
    def allowed = required + ['protein_embeddings']
    def numbered = []
    sheet.readLines().eachWithIndex { l, i ->
        def t = l.replace('\uFEFF', '').trim()
        if (t) {
            numbered << [i + 1, t]
        }
    }
    if (numbered.size() < 2) {
        speciesSheetError(sheet, 1, "no species: expected the header '${required.join(',')}' and one row per species")
    }
    def header_no = numbered[0][0]
    def header = splitCsvLine(numbered[0][1]).collect { h -> h.toLowerCase() }
    header.each { h ->
        if (!(h in allowed)) {
            speciesSheetError(sheet, header_no, "unknown column '${h}'; allowed columns: ${required.join(', ')} (required), protein_embeddings (optional)")
        }
        if (header.count(h) > 1) {
            speciesSheetError(sheet, header_no, "column '${h}' appears more than once in the header")
        }
    }
    required.each { c ->
        if (!(c in header)) {
            speciesSheetError(sheet, header_no, "missing required column '${c}'; the header must contain ${required.join(',')}")
        }
    }
    def builtin = builtinSpecies()
    def seen = [:]
    def rows = []
    numbered.drop(1).each { entry ->
        def line_no = entry[0]
        def fields = splitCsvLine(entry[1])
        if (fields.size() != header.size()) {
            speciesSheetError(sheet, line_no, "${fields.size()} field(s) but the header has ${header.size()} (${header.join(',')})")
        }
        def row = [header, fields].transpose().collectEntries { h, v -> [h, v] }
        required.each { c ->
            if (!row[c]) {
                speciesSheetError(sheet, line_no, "empty value in required column '${c}'")
            }
        }
        def species = row.species
        if (!(species ==~ /^[a-z_]+$/)) {
            speciesSheetError(sheet, line_no, "species '${species}' is not a valid species name: use lower-case letters and '_' only (as in the samplesheet), e.g. chicken or gallus_gallus")
        }
        if (species.toLowerCase() in builtin || builtin.any { b -> b.equalsIgnoreCase(species) }) {
            speciesSheetError(sheet, line_no, "species '${species}' is one of the 8 built-in UCE species (${builtin.join(', ')}), whose files come from --model_dir; give the new species another name or remove the row")
        }
        if (seen.containsKey(species)) {
            speciesSheetError(sheet, line_no, "duplicate species '${species}' (first on line ${seen[species]}); one row per species")
        }
        seen[species] = line_no
        if (!(row.taxonomy_id ==~ /^[0-9]+$/) || row.taxonomy_id.toBigInteger() < 1 || row.taxonomy_id.toBigInteger() > Long.MAX_VALUE) {
            speciesSheetError(sheet, line_no, "taxonomy_id '${row.taxonomy_id}' is not a positive integer; use the NCBI taxonomy id (e.g. 9031 for chicken): it seeds the chromosome tokens")
        }
        def fasta = resolveH5ad(sheet, row.fasta)
        if (isLocal(fasta) && !fasta.isFile()) {
            speciesSheetError(sheet, line_no, "fasta file not found: ${fasta} (relative paths are resolved against the sheet's folder ${sheet.parent}); pass the Ensembl <Species>.<assembly>.pep.all.fa.gz")
        }
        def pe = []
        if (row.protein_embeddings) {
            pe = resolveH5ad(sheet, row.protein_embeddings)
            if (isLocal(pe) && !pe.isFile()) {
                speciesSheetError(sheet, line_no, "protein_embeddings file not found: ${pe}; pass the gene -> embedding .pt, or leave the field empty to compute it with --esm_model")
            }
        }
        def esm = params.esm_model ? file(params.esm_model.toString()).name : 'none'
        def source = pe ? "species sheet: ${fasta.name} + precomputed ${pe.name}" : "species sheet: ${fasta.name} + ESM model ${esm}"
        def meta = [id: species, source: source.toString(), species: species, taxonomy_id: row.taxonomy_id.toLong(), precomputed: pe ? true : false,
                    gene_embeddings_file: pe ? pe.name : "${fastaPrefix(fasta.name)}.gene_symbol_to_embedding_ESM2.pt".toString()]
        rows << [meta, fasta, pe]
    }
    return rows
}
