/*
========================================================================================
    Samplesheet parsing, in plain Groovy (no nf-schema plugin offline).
========================================================================================
    CSV with a header. Required columns: sample, h5ad, species. Optional: gene_column,
    counts_layer (per-dataset settings of `uce preprocess`). Any other column is an error.

    h5ad paths: absolute, remote (s3://, gs://, https://...), or relative to the folder
    that holds the samplesheet (so a samplesheet and its data can move together).
    ${projectDir} and environment variables are not expanded.

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
        if (!row.h5ad.toLowerCase().endsWith('.h5ad')) {
            samplesheetError(sheet, line_no, "h5ad '${row.h5ad}' must be an AnnData file ending in .h5ad")
        }
        def h5ad = resolveH5ad(sheet, row.h5ad)
        if (isLocal(h5ad) && !h5ad.exists()) {
            samplesheetError(sheet, line_no, "h5ad file not found: ${h5ad} (relative paths are resolved against the samplesheet's folder ${sheet.parent})")
        }
        if (isLocal(h5ad) && h5ad.isDirectory()) {
            samplesheetError(sheet, line_no, "h5ad ${h5ad} is a directory; point to the .h5ad file")
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
