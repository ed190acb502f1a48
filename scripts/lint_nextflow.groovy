// Strict-syntax check of the pipeline's scripts and configs with Nextflow's own parser
// (io.nextflow:nf-lang, the code behind `nextflow lint` and the default parser of 26.04).
// Run by scripts/lint_nextflow.sh; prints `file:line:col: message` and exits 1 on errors.
import nextflow.config.control.ConfigParser
import nextflow.script.control.ScriptParser
import org.codehaus.groovy.control.messages.SyntaxErrorMessage

// nf-lang 25.04 flags task inputs (`meta`) in config closures; later versions accept them
// ("dynamic process directives can reference process inputs"), so these are not errors.
def knownFalsePositive = { String file, String msg ->
    file.endsWith('.config') && msg ==~ /`(meta|task)` is not defined/
}

def scripts = new ScriptParser()
def configs = new ConfigParser()
args.each { a -> a.endsWith('.nf') ? scripts.parse(new File(a)) : configs.parse(new File(a)) }
scripts.analyze()
configs.analyze()

int errors = 0
int ignored = 0
[scripts.compiler(), configs.compiler()].each { compiler ->
    compiler.getSources().values().sort { s -> s.getName() }.each { src ->
        src.getErrorCollector().getErrors()?.each { m ->
            if (m instanceof SyntaxErrorMessage) {
                def e = m.cause
                def msg = e.getOriginalMessage()
                if (knownFalsePositive(src.getName(), msg)) {
                    ignored++
                } else {
                    println "${src.getName()}:${e.getStartLine()}:${e.getStartColumn()}: error: ${msg}"
                    errors++
                }
            } else {
                println "${src.getName()}: error: ${m}"
                errors++
            }
        }
    }
}
println "strict syntax: ${args.size()} file(s), ${errors} error(s), ${ignored} known nf-lang 25.04 false positive(s) ignored"
System.exit(errors ? 1 : 0)
