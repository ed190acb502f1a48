/*
========================================================================================
    Parameter validation and --help from nextflow_schema.json, in plain Groovy.
========================================================================================
    nf-schema/nf-validation are plugins, downloaded at run time: unusable offline. This
    covers what the pipeline needs: type, enum, minimum/maximum, pattern, required, and
    existence of file-path/directory-path params, unknown params (errors, with a "did you
    mean"). Every failure is one line naming the param, what is wrong and how to fix it; all
    of them are reported together, before any task is submitted.

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

// Numeric value of an integer param: a whole-number string or Number, else null. The
// legacy CLI parser turns a huge number into a Double (99999999999999999999 -> 1.0E20).
def wholeNumber(value) {
    if (value instanceof Number) {
        def d = new BigDecimal(value.toString())
        return d.stripTrailingZeros().scale() <= 0 ? d : null
    }
    def s = value.toString().trim()
    return s ==~ /^[+-]?\d+$/ ? new BigDecimal(s) : null
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
        num = wholeNumber(value)
        if (num == null) {
            return "${flag} expects a whole number, got '${s}'; pass e.g. ${flag} ${prop.default ?: 1}"
        }
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
    def lo = prop.minimum != null ? new BigDecimal(prop.minimum.toString()) : null
    def hi = prop.maximum != null ? new BigDecimal(prop.maximum.toString()) : null
    def shown = num != null ? num.toPlainString() : s
    if (num != null && lo != null && hi != null && (num < lo || num > hi)) {
        return "${flag} must be between ${prop.minimum} and ${prop.maximum}, got ${shown}; pass a value in that range${example}"
    }
    if (num != null && lo != null && num < lo) {
        return "${flag} must be >= ${prop.minimum}, got ${shown}; pass a larger value${example}"
    }
    if (num != null && hi != null && num > hi) {
        return "${flag} must be <= ${prop.maximum}, got ${shown}; pass a smaller value${example}"
    }
    if (prop.pattern && !(s ==~ prop.pattern)) {
        // errorMessage: the schema's own wording (nf-schema's key), else the regex
        return prop.errorMessage ? "${flag} '${s}': ${prop.errorMessage}" : "${flag} '${s}' does not match ${prop.pattern}: ${prop.description ?: ''}".trim()
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

// Levenshtein distance, for "did you mean" (higher-order functions: no loops in strict syntax).
def editDistance(a, b) {
    def prev = (0..b.size()).collect { j -> j }
    a.toList().eachWithIndex { ca, i ->
        def cur = [i + 1]
        b.toList().eachWithIndex { cb, j ->
            cur << [prev[j + 1] + 1, cur[j] + 1, prev[j] + (ca == cb ? 0 : 1)].min()
        }
        prev = cur
    }
    return prev[b.size()]
}

// 'batchSize', 'batch-size', 'Batch_Size' -> 'batch_size'
def snakeName(name) {
    return name.toString().replaceAll(/([a-z0-9])([A-Z])/, '$1_$2').replace('-', '_').toLowerCase()
}

// The closest known param, or null when none is close enough to be a likely typo.
def closestParam(name, known) {
    def target = snakeName(name).replace('_', '')
    def best = known.collect { k -> [k, editDistance(target, snakeName(k).replace('_', ''))] }.min { p -> p[1] }
    def limit = Math.max(1, Math.min(3, target.size().intdiv(3)))
    return best && best[1] <= limit ? best[0] : null
}

// How the user typed a param: Nextflow 24.10 turns `--batch-size` on the command line into
// the key `batchSize` (a params file keeps `batch-size`), so the command line is consulted.
def spelledAs(key, command_line) {
    def k = key.toString()
    def kebab = k.replaceAll(/([a-z0-9])([A-Z])/, '$1-$2').toLowerCase()
    def given = (command_line ?: '').toString().tokenize(" \t'\"").collect { t -> t.tokenize('=')[0] }
    return kebab != k && !("--${k}".toString() in given) && ("--${kebab}".toString() in given) ? "--${kebab}" : "--${k}"
}

// nf-core params that this pipeline replaced by config settings
def retiredParams() {
    def limits = 'resources are capped by process.resourceLimits (and to the machine with the local executor); set e.g. process { resourceLimits = [cpus: 8, memory: 60.GB, time: 24.h] } in a config passed with -c'
    return [max_cpus: limits, max_memory: limits, max_time: limits]
}

// One line per unknown param, with a suggestion. Unknown params are errors (as in nf-schema
// >= 2): a typo would otherwise keep the default silently, e.g. --batch-size 10 -> 25.
def unknownParamErrors(known, values, command_line) {
    def retired = retiredParams()
    def errors = []
    values.keySet().findAll { k -> !(k.toString() in known) }.each { k ->
        def flag = spelledAs(k, command_line)
        def snake = snakeName(k)
        if (snake in retired) {
            errors << "${flag}: not a parameter of this pipeline; ${retired[snake]}"
        } else if (snake in known) {
            errors << "${flag}: unknown parameter; did you mean --${snake}? (parameters are spelled with underscores)"
        } else {
            def near = closestParam(k, known)
            def hint = near ? "did you mean --${near}?" : 'see --help for the list'
            errors << "${flag}: unknown parameter; ${hint} (--validate_params false skips this check)"
        }
    }
    return errors
}

// Every problem of a params map, one line each (empty list: all fine): schema checks,
// unknown params and the cross-param rules of this pipeline.
// values: the params map (an argument so that tests can check many sets in one launch).
def paramErrors(schema_path, values, command_line) {
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
    // Compat mode replays the reference's batches: batch_size 0 (chosen from GPU memory)
    // has no reference equivalent (it would divide by zero when shards are rounded).
    def batch = isBlank(values.batch_size) ? null : wholeNumber(values.batch_size)
    if (values.compat?.toString() == 'reference' && batch != null && batch == 0) {
        errors << "--batch_size 0 (auto) works only with --compat none; in compat mode pass the reference's batch size, e.g. --batch_size 25"
    }
    errors.addAll(unknownParamErrors(props.keySet(), values, command_line))
    return errors
}

// --reference_samples must name samples of the samplesheet (sample ids in samplesheet order):
// one line naming the unknown ids and the known ones; null when all are known (or unset).
def referenceSampleError(reference_samples, sample_ids) {
    if (isBlank(reference_samples)) {
        return null
    }
    def wanted = reference_samples.toString().tokenize(',').collect { r -> r.trim() }.findAll { r -> r }
    def unknown = wanted.findAll { r -> !(r in sample_ids) }
    if (!unknown) {
        return null
    }
    def known = sample_ids.size() > 10 ? sample_ids.take(10).join(', ') + ", ... (${sample_ids.size()} samples)" : sample_ids.join(', ')
    return "--reference_samples: ${unknown.collect { r -> "'${r}'" }.join(', ')} not in the samplesheet's sample column (${known}); pass sample ids from the samplesheet, comma-separated"
}

// Fails with every invalid param, one line each (the harness of tests/nextflow calls this).
def validateParameters(schema_path, values) {
    def errors = paramErrors(schema_path, values, workflow.commandLine)
    if (errors) {
        error(errors.collect { e -> "Invalid parameter: ${e}" }.join('\n'))
    }
}

// --help <param>: type, default, range, choices and description of one param, or null
// when the schema does not know it.
def paramHelp(schema_path, name) {
    def props = schemaParams(schema_path)
    def prop = props[name.toString()]
    if (prop == null) {
        return null
    }
    def type = prop.type instanceof List ? prop.type.join('|') : prop.type
    def lines = ["--${name}  [${type}]  (${prop.group})", "    ${prop.description ?: 'no description'}"]
    if (prop['enum']) {
        lines << "    choices: ${prop['enum'].join(', ')}"
    }
    if (prop.minimum != null && prop.maximum != null) {
        lines << "    range: ${prop.minimum} .. ${prop.maximum}"
    } else if (prop.minimum != null) {
        lines << "    minimum: ${prop.minimum}"
    } else if (prop.maximum != null) {
        lines << "    maximum: ${prop.maximum}"
    }
    if (prop.pattern) {
        lines << "    pattern: ${prop.pattern}"
    }
    lines << "    default: ${prop.default != null ? prop.default : 'none'}${prop.required ? ' (required)' : ''}"
    return '\n' + lines.join('\n') + '\n'
}

// Error line for --help <name> when the schema does not know <name>.
def unknownHelpError(schema_path, name) {
    def near = closestParam(name, schemaParams(schema_path).keySet())
    return "--help ${name}: unknown parameter; ${near ? "did you mean --help ${near}?" : 'run --help for the list'}"
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
        '  nextflow run . --help batch_size                   # one parameter in detail',
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
