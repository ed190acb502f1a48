#!/usr/bin/env bash
# Installs Nextflow without get.nextflow.io: resolves io.nextflow:nextflow:24.10.x from Maven
# Central into a flat classpath and writes a launcher script. Idempotent and quick on re-runs.
#
#   bash scripts/install_nextflow.sh            # then: export PATH=${UCE_NF_CACHE:-~/.cache/uce-nf}/bin:$PATH
#
# Why 24.10.x: from 25.04 on the artifacts depend on io.seqera:* libraries that only exist in
# Seqera's own Maven repository; the 24.10 line resolves from Maven Central alone
# (see shared/docs/toolchain-offline.md). Verified on the dev machine (Java 17, Maven 3.8.7):
# 24.10.9 is not on Maven Central (its nextflow jar is missing), 24.10.8 resolves completely
# (54 jars) and `nextflow -version` reports "24.10.8 build 5940".
#
# Environment:
#   UCE_NF_CACHE       cache root (default ~/.cache/uce-nf)
#   NXF_VERSIONS       space-separated versions to try, in order (default 24.10.9 .. 24.10.0, 24.04.4 ..)
#   UCE_NF_FORCE_NXF=1 ignore a `nextflow` already on PATH
set -euo pipefail

cache=${UCE_NF_CACHE:-$HOME/.cache/uce-nf}
bindir=$cache/bin
launcher=$bindir/nextflow
versions=${NXF_VERSIONS:-"24.10.9 24.10.8 24.10.7 24.10.6 24.10.5 24.10.4 24.10.3 24.10.2 24.10.1 24.10.0 24.04.4 24.04.3 24.04.2 24.04.1 24.04.0"}

log() { echo "[install_nextflow] $*" >&2; }

# True when "$1" (x.y.z) >= 24.10.0.
version_ok() {
    local major minor
    IFS=. read -r major minor _ <<<"$1"
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
    (( major > 24 || (major == 24 && minor >= 10) ))
}

# Version printed by `nextflow -version` ("version 24.10.9 build 5937"), empty on failure.
nxf_version() {
    NXF_OFFLINE=true "$1" -version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n1
}

# 1. Anything already usable? (A user's own Nextflow on PATH, or our launcher from a past run.)
if [[ ${UCE_NF_FORCE_NXF:-0} != 1 ]]; then
    for cand in "$(command -v nextflow || true)" "$launcher"; do
        [[ -n $cand && -x $cand ]] || continue
        v=$(nxf_version "$cand")
        if [[ -n $v ]] && version_ok "$v"; then
            log "nextflow $v already available at $cand; nothing to do"
            echo "$cand"
            exit 0
        fi
    done
fi

command -v java >/dev/null || { log "java (>= 11) is required"; exit 1; }
command -v mvn  >/dev/null || { log "Maven (mvn) is required: apt-get install maven"; exit 1; }

# 2. Resolve the first version that Maven Central serves completely.
resolve() {
    local ver=$1 dest=$cache/nextflow/$1 tmp
    [[ -f $dest/.complete ]] && return 0
    tmp=$(mktemp -d "$cache/nextflow/.resolve-$ver.XXXXXX")
    # Exclusions: commons-logging clashes with jcl-over-slf4j, and a second Groovy
    # (org.codehaus.groovy) next to org.apache.groovy breaks Groovy's module loading.
    cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.uce-nf</groupId>
  <artifactId>nextflow-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.nextflow</groupId>
      <artifactId>nextflow</artifactId>
      <version>$ver</version>
      <exclusions>
        <exclusion><groupId>commons-logging</groupId><artifactId>commons-logging</artifactId></exclusion>
        <exclusion><groupId>org.codehaus.groovy</groupId><artifactId>*</artifactId></exclusion>
      </exclusions>
    </dependency>
  </dependencies>
</project>
EOF
    log "resolving io.nextflow:nextflow:$ver from Maven Central (~/.m2 keeps re-runs fast)"
    if mvn -B -q -f "$tmp/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$tmp/lib" >"$tmp/mvn.log" 2>&1 \
        && ls "$tmp"/lib/nextflow-"$ver"*.jar >/dev/null 2>&1; then
        rm -rf "$dest"
        mkdir -p "$dest"
        mv "$tmp/lib" "$dest/lib"
        cp "$tmp/pom.xml" "$dest/pom.xml"
        touch "$dest/.complete"
        rm -rf "$tmp"
        return 0
    fi
    log "$ver did not resolve (last lines of the Maven log):"
    tail -n 5 "$tmp/mvn.log" >&2 || true
    rm -rf "$tmp"
    return 1
}

mkdir -p "$cache/nextflow" "$bindir"
chosen=""
for ver in $versions; do
    if resolve "$ver"; then chosen=$ver; break; fi
done
[[ -n $chosen ]] || { log "no Nextflow version resolved from: $versions"; exit 1; }

# 3. Launcher. Same JVM flags as the official launcher: without the --add-opens flags
# `-resume` silently re-runs every task (nextflow-io/nextflow#7471).
lib=$cache/nextflow/$chosen/lib
opens=""
for pkg in java.lang java.io java.nio java.net java.util java.util.concurrent.locks \
           java.util.concurrent.atomic java.nio.file.spi sun.nio.ch sun.nio.fs \
           sun.net.www.protocol.http sun.net.www.protocol.https sun.net.www.protocol.ftp \
           sun.net.www.protocol.file jdk.internal.misc jdk.internal.vm java.util.regex; do
    opens+=" --add-opens=java.base/$pkg=ALL-UNNAMED"
done
tmp_launcher=$(mktemp "$bindir/.nextflow.XXXXXX")
cat >"$tmp_launcher" <<EOF
#!/usr/bin/env bash
# Nextflow $chosen launcher written by uce-nf scripts/install_nextflow.sh (flat Maven classpath).
export NXF_HOME=\${NXF_HOME:-$cache/nextflow/home}
export NXF_CLI="\$0 \$*"
mkdir -p "\$NXF_HOME"
JAVA=\${JAVA_CMD:-java}
[[ -n \${JAVA_HOME:-} && -x \$JAVA_HOME/bin/java && -z \${JAVA_CMD:-} ]] && JAVA=\$JAVA_HOME/bin/java
exec "\$JAVA" \${NXF_OPTS:-} -Dfile.encoding=UTF-8 -Dcapsule.trampoline \\
  -Dcom.sun.security.enableAIAcaIssuers=true -Djava.awt.headless=true \\
 $opens \\
  -cp '$lib/*' nextflow.cli.Launcher "\$@"
EOF
chmod +x "$tmp_launcher"
mv "$tmp_launcher" "$launcher"

v=$(nxf_version "$launcher")
if [[ $v != "$chosen" ]]; then
    log "launcher check failed: '$launcher -version' reported '${v:-nothing}', expected $chosen"
    exit 1
fi
log "nextflow $chosen installed: $launcher (add $bindir to PATH)"
echo "$launcher"
