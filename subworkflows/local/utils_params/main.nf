/*
========================================================================================
    Parameter validation and --help from nextflow_schema.json, in plain Groovy.
========================================================================================
    nf-schema/nf-validation are plugins, downloaded at run time: unusable offline. This
    covers what the pipeline needs: type, enum, minimum/maximum, pattern, required, and
    existence of file-path/directory-path params. Every failure is one line naming the
    param, what is wrong and how to fix it, and happens before any task is submitted.

    Types are checked leniently on purpose: the strict syntax parser of Nextflow >= 26.04
    passes command-line values as strings ('25', 'false'), the legacy parser converts them.
    Both are accepted; the pipeline reads booleans with asBool().
----------------------------------------------------------------------------------------
*/

// Flat view of the schema: name -> property map, plus 'group' and 'required' keys.
def schemaParams(schema_path) {
    def schema = new groovy.json.JsonSlurper().parseText(file(schema_path).text)
    def groups = (schema['$defs'] ?: schema.definitions ?: [:])
    def flat = [:]
    groups.each { gname, group ->
        def req = group.required ?: []
        (group.properties ?: [:]).each { name, prop ->
            flat[name] = prop + [group: group.title ?: gname, required: req.contains(name)]
        }
    }
    def top_req = schema.required ?: []
    (schema.properties ?: [:]).each { name, prop ->
        flat[name] = prop + [group: 'Other parameters', required: top_req.contains(name)]
    }
    return flat
}

// Boolean from a Boolean or a command-line string ('true', 'false').
def asBool(v) {
    if (v == null) {
        return false
    }
    return v instanceof Boolean ? v : v.toString().trim().toLowerCase() in ['true', 'yes', '1']
}

def isBlank(v) {
    return v == null || (!(v instanceof Boolean) && v.toString().trim() == '')
}

// Local files are checked here; remote ones (s3://, gs://, https://...) by the tasks.
def isLocalPath(p) {
    return !(p.toString() ==~ /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\/.*/) || p.toString().startsWith('file://')
}

// Error message for one param, or null when the value is fine. check_exists: false skips
// the existence check of file-path/directory-path params (e.g. a folder still to be filled).
def checkParam(name, prop, value, check_exists) {
    def flag = "--${name}"
    def example = prop.default != null ? " (default: ${prop.default})" : ''
    if (isBlank(value)) {
        return prop.required ? "${flag} is required: ${prop.description ?: 'no description'}; pass ${flag} <value>" : null
    }
    def type = prop.type instanceof List ? prop.type.find { t -> t != 'null' } : prop.type
    def s = value.toString().trim()
    def num = null
    if (type == 'boolean') {
        if (!(value instanceof Boolean) && !(s.toLowerCase() in ['true', 'false'])) {
            return "${flag} expects true or false, got '${s}'; pass ${flag} true or ${flag} false"
        }
        return null
    }
    if (value instanceof Boolean) {
        return "${flag} expects a value (${type}), got a bare flag; pass ${flag} <value>${example}"
    }
    if (type == 'integer') {
        if (!(s ==~ /^[+-]?\d+$/)) {
            return "${flag} expects a whole number, got '${s}'; pass e.g. ${flag} ${prop.default ?: 1}"
        }
        num = new BigDecimal(s)
    }
    if (type == 'number') {
        if (!s.isNumber()) {
            return "${flag} expects a number, got '${s}'; pass e.g. ${flag} ${prop.default ?: 1}"
        }
        num = new BigDecimal(s)
    }
    if (prop['enum'] && !(s in prop['enum'].collect { e -> e.toString() })) {
        return "${flag} must be one of ${prop['enum'].join(', ')}, got '${s}'; pass e.g. ${flag} ${prop['enum'][0]}"
    }
    if (num != null && prop.minimum != null && num < new BigDecimal(prop.minimum.toString())) {
        return "${flag} must be >= ${prop.minimum}, got ${s}; pass a larger value${example}"
    }
    if (num != null && prop.maximum != null && num > new BigDecimal(prop.maximum.toString())) {
        return "${flag} must be <= ${prop.maximum}, got ${s}; pass a smaller value${example}"
    }
    if (prop.pattern && !(s ==~ prop.pattern)) {
        return "${flag} '${s}' does not match ${prop.pattern}: ${prop.description ?: ''}".trim()
    }
    if (prop.exists && check_exists && isLocalPath(s)) {
        def f = file(s)
        if (prop.format == 'directory-path' && !f.isDirectory()) {
            return "${flag} '${s}': directory not found (${f}); pass an existing directory"
        }
        if (prop.format in ['file-path', 'path'] && !f.exists()) {
            return "${flag} '${s}': file not found (${f}); pass an existing file"
        }
    }
    return null
}

// Fails the run on the first invalid param (naming how many more there are); warns about
// params the schema does not know (typos). Also the cross-param rules of this pipeline.
// values: the params map (an argument so that tests can check many sets in one launch).
def validateParameters(schema_path, values) {
    def props = schemaParams(schema_path)
    def errors = []
    // --download_model_files fills --model_dir: it need not exist yet
    def download = asBool(values.download_model_files)
    props.each { name, prop ->
        def msg = checkParam(name, prop, values.get(name), !(download && name == 'model_dir'))
        if (msg) {
            errors << msg
        }
    }
    // model_dir: required unless the official files are downloaded by the run
    if (!download && isBlank(values.model_dir)) {
        errors << "--model_dir is required: the folder with the UCE model files (official layout); pass --model_dir <dir> or --download_model_files"
    }
    // download_model_files fetches one of the two official checkpoints
    def official = ['4layer_model.torch', '33l_8ep_1024t_1280.torch']
    if (download && !isBlank(values.model) && !values.model.toString().contains('/') && !(values.model.toString() in official)) {
        errors << "--model '${values.model}': --download_model_files fetches only ${official.join(' or ')}; pass one of them, or --model_dir with your checkpoint"
    }
    // model: a file name inside model_dir, or a path to a checkpoint
    if (!isBlank(values.model)) {
        def model = values.model.toString()
        if (model.contains('/')) {
            if (isLocalPath(model) && !file(model).exists()) {
                errors << "--model '${model}': checkpoint file not found; pass a file name inside --model_dir (e.g. 4layer_model.torch) or an existing path"
            }
        } else if (!download && !isBlank(values.model_dir) && isLocalPath(values.model_dir.toString()) && file(values.model_dir.toString()).isDirectory()) {
            def ckpt = file(values.model_dir.toString()).resolve(model)
            if (!ckpt.exists()) {
                errors << "--model '${model}': not found in --model_dir (${ckpt}); pass a checkpoint in that folder (4layer_model.torch or 33l_8ep_1024t_1280.torch) or a path"
            }
        }
    }
    // Unknown params: warn (a typo otherwise silently keeps the default)
    def known = props.keySet()
    def unknown = values.keySet().findAll { k ->
        def snake = k.toString().replaceAll(/([A-Z])/, '_$1').toLowerCase().replace('-', '_')
        !(k in known) && !(snake in known)
    }
    if (unknown) {
        log.warn("Unknown parameter(s), ignored: ${unknown.collect { k -> '--' + k }.join(', ')} (see --help)")
    }
    if (errors) {
        def more = errors.size() > 1 ? " (and ${errors.size() - 1} more invalid parameter(s))" : ''
        error("Invalid parameter: ${errors[0]}${more}")
    }
}

// --help text: every non-hidden param of the schema, by group.
def paramsHelp(schema_path) {
    def props = schemaParams(schema_path)
    def width = props.keySet().collect { k -> k.size() }.max() + 4
    def lines = [
        '',
        "${workflow.manifest.name} ${workflow.manifest.version}: ${workflow.manifest.description}",
        '',
        'Typical command:',
        "  nextflow run ${workflow.manifest.name} -profile docker,gpu --input samplesheet.csv --model_dir model_files --outdir results",
        '  nextflow run . -profile test --outdir results      # offline CPU demo',
        ''
    ]
    props.findAll { name, prop -> !prop.hidden }.groupBy { name, prop -> prop.group }.each { group, members ->
        lines << "${group}:"
        members.each { name, prop ->
            def type = prop.type instanceof List ? prop.type.join('|') : prop.type
            def choices = prop['enum'] ? " (${prop['enum'].join('|')})" : ''
            def dflt = prop.default != null ? " [default: ${prop.default}]" : ''
            def req = prop.required ? ' [required]' : ''
            lines << "  ${('--' + name).padRight(width)}[${type}] ${prop.description ?: ''}${choices}${dflt}${req}"
        }
        lines << ''
    }
    lines << 'Profiles: test, docker, podman, singularity, apptainer, gpu, slurm, awsbatch, google, k8s (see docs/usage.md)'
    lines << ''
    return lines.join('\n')
}
