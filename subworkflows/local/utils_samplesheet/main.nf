/*
========================================================================================
    Samplesheet parsing, in plain Groovy (no nf-schema plugin offline).
========================================================================================
    CSV with a header. Required columns: sample, h5ad, species. Optional: gene_column,
    counts_layer (per-dataset settings of `uce preprocess`). Any other column is an error.

    h5ad paths: absolute, remote (s3://, gs://, https://...), or relative to the folder
    that holds the samplesheet (so a samplesheet and its data can move together).
    ${projectDir} and environment variables are not expanded. The column keeps its name, but
    takes every input format (docs/usage.md): an AnnData .h5ad file or .zarr folder, a Cell
    Ranger .h5 file or mtx folder. Here only the name and, for local folders, their marker files
    are checked; VALIDATE reads the content (src/uce_nf/formats.py). Loom and Seurat files get a
    one-line hint on how to convert them.

    The species column is checked for shape here (lower-case letters and '_'); whether the
    model files know it is checked by the VALIDATE process against species_offsets.pkl.
    Every error is one line: file, line number, what is wrong and how to fix it. Parsing
    happens while the workflow is built, so a bad samplesheet fails before any task runs.
----------------------------------------------------------------------------------------
*/

def samplesheetColumns() {
    return [required: ['sample', 'h5ad', 'species'], optional: ['gene_column', 'counts_layer']]
}

// Splits one CSV line; double-quoted fields may hold commas and "" for a quote.
def splitCsvLine(line) {
    def fields = []
    def m = line =~ /(?:^|,)("(?:[^"]|"")*"|[^,]*)/
    m.each { match ->
        def f = match[1].trim()
        if (f.size() >= 2 && f.startsWith('"') && f.endsWith('"')) {
            f = f.substring(1, f.size() - 1).replace('""', '"')
        }
        fields << f.trim()
    }
    return fields
}

// Input formats read by content elsewhere (src/uce_nf/formats.py); the names seen here.
def acceptedInputs() {
    return "an AnnData .h5ad file or .zarr folder, a Cell Ranger filtered_feature_bc_matrix.h5 or a Cell Ranger mtx folder (matrix.mtx(.gz), features.tsv(.gz), barcodes.tsv(.gz))"
}

// One-line conversion hint for formats that are out of scope, or null.
def outOfScopeHint(name) {
    if (name.endsWith('.loom')) {
        return "Loom files are not read; convert it to h5ad first: python -c \"import anndata; anndata.read_loom('in.loom').write_h5ad('out.h5ad')\""
    }
    if (['.rds', '.h5seurat', '.rda', '.rdata'].any { e -> name.endsWith(e) }) {
        return "Seurat files are not read; convert to h5ad first, e.g. in R sceasy::convertFormat(obj, from='seurat', to='anndata', outFile='out.h5ad') or SeuratDisk::Convert('in.h5seurat', dest='h5ad')"
    }
    return null
}

// A local folder that is an AnnData zarr store or a Cell Ranger mtx folder (by its marker files).
def isDatasetFolder(dir) {
    return ['.zgroup', '.zattrs', 'zarr.json', 'matrix.mtx', 'matrix.mtx.gz'].any { m -> dir.resolve(m).exists() }
}

def samplesheetError(sheet, line_no, msg) {
    error("Samplesheet error: ${sheet} line ${line_no}: ${msg}")
}

// Resolves an h5ad entry against the samplesheet's folder (see header).
def resolveH5ad(sheet, value) {
    if (value ==~ /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\/.*/ || value.startsWith('/') || value.startsWith('~')) {
        return file(value)
    }
    return sheet.parent.resolve(value).normalize()
}

// Returns [[meta, h5ad], ...] in samplesheet order; meta = [id, species] plus the
// optional columns that have a value.
def parseSamplesheet(sheet_path) {
    if (!sheet_path || sheet_path instanceof Boolean) {
        error("Invalid parameter: --input is required: the samplesheet CSV (sample,h5ad,species); pass --input <samplesheet.csv>")
    }
    def sheet = file(sheet_path.toString())
    def cols = samplesheetColumns()
    def expected = cols.required.join(',')
    if (!sheet.exists()) {
        error("Samplesheet error: ${sheet}: file not found; pass --input <samplesheet.csv>")
    }
    def lines = sheet.readLines()
    if (lines) {
        lines[0] = lines[0].replace('\uFEFF', '')   // byte-order mark from spreadsheet exports
    }
    // Line numbers are 1-based and count blank lines too, as an editor shows them.
    def numbered = []
    lines.eachWithIndex { l, i ->
        if (l.trim()) {
            numbered << [i + 1, l.trim()]
        }
    }
    if (!numbered) {
        samplesheetError(sheet, 1, "the file is empty; expected the header '${expected}' and one row per dataset")
    }
    def header_no = numbered[0][0]
    def header = splitCsvLine(numbered[0][1]).collect { h -> h.toLowerCase() }
    def allowed = cols.required + cols.optional
    header.each { h ->
        if (!h) {
            samplesheetError(sheet, header_no, "empty column name in the header; expected '${expected}'")
        }
        if (!(h in allowed)) {
            samplesheetError(sheet, header_no, "unknown column '${h}'; allowed columns: ${cols.required.join(', ')} (required), ${cols.optional.join(', ')} (optional)")
        }
        if (header.count(h) > 1) {
            samplesheetError(sheet, header_no, "column '${h}' appears more than once in the header")
        }
    }
    cols.required.each { c ->
        if (!(c in header)) {
            samplesheetError(sheet, header_no, "missing required column '${c}'; the header must contain ${expected}")
        }
    }
    if (numbered.size() < 2) {
        samplesheetError(sheet, header_no + 1, "no datasets: the header is there but no rows follow; add one row per dataset (${expected})")
    }
    def seen = [:]
    def rows = []
    numbered.drop(1).each { entry ->
        def line_no = entry[0]
        def fields = splitCsvLine(entry[1])
        if (fields.size() > header.size()) {
            samplesheetError(sheet, line_no, "${fields.size()} fields but the header has ${header.size()} (${header.join(',')}); remove the extra field, or quote a value that contains a comma")
        }
        if (fields.size() < header.size()) {
            samplesheetError(sheet, line_no, "${fields.size()} field(s) but the header has ${header.size()}: missing value for column '${header[fields.size()]}'")
        }
        def row = [header, fields].transpose().collectEntries { h, v -> [h, v] }
        cols.required.each { c ->
            if (!row[c]) {
                samplesheetError(sheet, line_no, "empty value in required column '${c}'")
            }
        }
        def sample = row.sample
        if (!(sample ==~ /^[A-Za-z0-9][A-Za-z0-9._-]*$/)) {
            samplesheetError(sheet, line_no, "sample '${sample}' may only contain letters, digits, '.', '_' and '-' (it names the output files)")
        }
        if (seen.containsKey(sample)) {
            samplesheetError(sheet, line_no, "duplicate sample '${sample}' (first on line ${seen[sample]}); sample ids must be unique")
        }
        seen[sample] = line_no
        def species = row.species
        if (!(species ==~ /^[a-z_]+$/)) {
            samplesheetError(sheet, line_no, "species '${species}' is not a valid species name: use lower-case letters and '_' only, e.g. human, mouse, macaca_mulatta")
        }
        def name = row.h5ad.replaceAll('/+$', '').toLowerCase()
        def hint = outOfScopeHint(name)
        if (hint) {
            samplesheetError(sheet, line_no, "h5ad '${row.h5ad}': ${hint}")
        }
        def h5ad = resolveH5ad(sheet, row.h5ad)
        if (isLocal(h5ad) && !h5ad.exists()) {
            samplesheetError(sheet, line_no, "h5ad file not found: ${h5ad} (relative paths are resolved against the samplesheet's folder ${sheet.parent})")
        }
        // remote folders cannot be listed cheaply here: a trailing '/' or .zarr says folder
        def folder = isLocal(h5ad) ? h5ad.isDirectory() : (row.h5ad.endsWith('/') || name.endsWith('.zarr'))
        if (folder && isLocal(h5ad) && !isDatasetFolder(h5ad)) {
            samplesheetError(sheet, line_no, "h5ad ${h5ad} is a folder but neither an AnnData .zarr store (.zgroup/.zattrs) nor a Cell Ranger mtx folder (matrix.mtx(.gz)); the input must be ${acceptedInputs()}")
        }
        if (!folder && !(name.endsWith('.h5ad') || name.endsWith('.h5'))) {
            samplesheetError(sheet, line_no, "h5ad '${row.h5ad}' is not an accepted input: it must be ${acceptedInputs()}")
        }
        def meta = [id: sample, species: species]
        cols.optional.each { c ->
            if (row[c]) {
                meta[c] = row[c]
            }
        }
        rows << [meta, h5ad]
    }
    return rows
}

def isLocal(path) {
    return path.toUri().getScheme() == 'file'
}
