#!/usr/bin/env bash
# Checks every Nextflow script and config of the pipeline with the strict syntax parser
# (default from Nextflow 26.04). Nextflow >= 25.04 cannot be resolved offline (it needs
# io.seqera:* artifacts), but its parser, io.nextflow:nf-lang, is on Maven Central
# (25.04.0 only); it is resolved into the cache once and run on a flat classpath.
#
#   bash scripts/lint_nextflow.sh            # exit 0: no strict-syntax errors
#
# With a Nextflow >= 25.04 on PATH, `nextflow lint .` does the same job.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${UCE_NF_CACHE:-$HOME/.cache/uce-nf}
ver=${NF_LANG_VERSION:-25.04.0}
lib=$cache/nf-lang/$ver/lib

if [[ ! -f $cache/nf-lang/$ver/.complete ]]; then
    tmp=$(mktemp -d)
    cat >"$tmp/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.uce-nf</groupId><artifactId>nf-lang-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>io.nextflow</groupId><artifactId>nf-lang</artifactId><version>$ver</version></dependency>
    <!-- on Nextflow's own classpath, used by the pipeline's Groovy code -->
    <dependency><groupId>org.apache.groovy</groupId><artifactId>groovy-json</artifactId><version>4.0.26</version></dependency>
    <dependency><groupId>org.yaml</groupId><artifactId>snakeyaml</artifactId><version>2.2</version></dependency>
  </dependencies>
</project>
POM
    echo "[lint_nextflow] resolving io.nextflow:nf-lang:$ver from Maven Central" >&2
    mvn -B -q -f "$tmp/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$tmp/lib" >"$tmp/mvn.log" 2>&1 || { tail -n 20 "$tmp/mvn.log" >&2; exit 1; }
    rm -rf "$cache/nf-lang/$ver"
    mkdir -p "$cache/nf-lang/$ver"
    mv "$tmp/lib" "$lib"
    touch "$cache/nf-lang/$ver/.complete"
    rm -rf "$tmp"
fi

cd "$here"
mapfile -t files < <(ls main.nf nextflow.config workflows/*.nf conf/*.config \
    subworkflows/local/*/main.nf modules/local/*/main.nf 2>/dev/null)
exec java -cp "$lib/*" groovy.ui.GroovyMain "$here/scripts/lint_nextflow.groovy" "${files[@]}"
