#!/usr/bin/env bash
# Sets up podman on THIS (development/CI) machine and builds the pipeline image, idempotently:
#   1. installs podman, runc, debootstrap, uidmap, fuse-overlayfs via apt if missing (root only);
#   2. writes a machine-specific containers.conf (runtime runc, ulimits within the sandbox's hard
#      limits) to $UCE_NF_CACHE/podman/containers.conf. It is used only through CONTAINERS_CONF by
#      this script and by the tests; it is NOT part of the pipeline config users get;
#   3. creates the base image docker.io/library/debian:bookworm-slim locally (debootstrap minbase +
#      podman import; the rootfs tarball is cached) unless it is already present, so the
#      Dockerfile's plain `FROM debian:bookworm-slim` resolves without a registry;
#   4. builds ghcr.io/uce-nf/uce-nf:<pipeline version> from the repo root with layer cache and pip
#      cache mount, so a rebuild with nothing changed takes seconds. Prints build time and size.
#
# Usage: scripts/setup_podman.sh [--no-build] [extra `podman build` args, e.g. --no-cache]
# Env:   UCE_NF_CACHE           cache root (default $HOME/.cache/uce-nf)
#        UCE_NF_IMAGE           image name (default ghcr.io/uce-nf/uce-nf:<version>)
#        UCE_NF_REQUIRE_PODMAN  1: podman being unusable is an error (exit 1), not a skip (exit 0)
#        UCE_NF_BASE=pull       pull the real base image instead of debootstrap (needs a registry)
#        DEBIAN_MIRROR          debootstrap mirror (default http://deb.debian.org/debian)
#        UCE_NF_PRUNE=0         keep dangling images (default: prune them after a build)
#
# Machine-readable lines on stdout (the tests parse them):
#   UCE_NF_PODMAN=unavailable: <reason>      podman cannot run here; exit 0 (tests skip)
#   UCE_NF_PODMAN=ok image=<ref> build_seconds=<s> size_bytes=<n> containers_conf=<path>
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${UCE_NF_CACHE:-$HOME/.cache/uce-nf}
pdir=$cache/podman
conf=$pdir/containers.conf
base=docker.io/library/debian:bookworm-slim
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca=/etc/ssl/certs/ca-certificates.crt

log() { echo "[setup_podman] $*" >&2; }
unavailable() {
  if [ "${UCE_NF_REQUIRE_PODMAN:-0}" = 1 ]; then
    log "ERROR: podman unavailable and UCE_NF_REQUIRE_PODMAN=1: $*"
    exit 1
  fi
  log "podman cannot run on this machine: $*"
  echo "UCE_NF_PODMAN=unavailable: $*"
  exit 0
}

build=1
if [ "${1:-}" = --no-build ]; then build=0; shift; fi

# --- versions: the image tag is the pipeline version ----------------------------------------
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$here/pyproject.toml" | head -n1)
[ -n "$version" ] || { log "ERROR: no version in pyproject.toml"; exit 1; }
if [ -f "$here/nextflow.config" ]; then
  nf_version=$(sed -n "s/^[[:space:]]*version[[:space:]]*=[[:space:]]*['\"]\([^'\"]*\)['\"].*/\1/p" \
    "$here/nextflow.config" | head -n1)
  if [ -n "$nf_version" ] && [ "$nf_version" != "$version" ]; then
    log "ERROR: manifest.version ($nf_version) in nextflow.config != pyproject.toml ($version)"
    exit 1
  fi
fi
image=${UCE_NF_IMAGE:-ghcr.io/uce-nf/uce-nf:$version}

# --- 1. tools --------------------------------------------------------------------------------
need=()
for tool in podman runc debootstrap newuidmap fuse-overlayfs; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    command -v podman >/dev/null 2>&1 || unavailable "podman is not installed and cannot be installed here (needs root and apt-get)"
    log "missing ${need[*]} (not root or no apt-get); trying with what is there"
  else
    log "installing podman runc debootstrap uidmap fuse-overlayfs (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends \
             podman runc debootstrap uidmap fuse-overlayfs slirp4netns containernetworking-plugins \
             iptables ca-certificates >&2; }; then
      command -v podman >/dev/null 2>&1 || unavailable "apt-get could not install podman"
    fi
  fi
fi

# --- 2. machine-specific containers.conf (test/CI only) --------------------------------------
mkdir -p "$pdir"
runtime=runc
command -v runc >/dev/null 2>&1 || runtime=crun
tmpconf=$(mktemp "$pdir/.containers.conf.XXXXXX")
cat > "$tmpconf" <<EOF
# Written by scripts/setup_podman.sh for THIS machine; used via CONTAINERS_CONF by the project's
# scripts and tests only. Users' pipeline configs never see it.
[containers]
# The default ulimits exceed this sandbox's hard limits ("setrlimit ... Operation not permitted").
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
# crun fails here ("cgroups in hybrid mode not supported"); runc works.
runtime = "$runtime"
EOF
if cmp -s "$tmpconf" "$conf"; then rm -f "$tmpconf"; else mv -f "$tmpconf" "$conf"; fi
export CONTAINERS_CONF=$conf

if ! podman info >/dev/null 2>"$pdir/podman-info.err"; then
  unavailable "'podman info' failed: $(tail -n1 "$pdir/podman-info.err")"
fi

# --- 3. base image -----------------------------------------------------------------------------
if podman image exists "$base"; then
  log "base image $base present"
elif [ "${UCE_NF_BASE:-debootstrap}" = pull ]; then
  podman pull "$base" >&2 || unavailable "could not pull $base"
else
  tarball=$pdir/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null 2>&1 || unavailable "no $base and no debootstrap to create it"
    [ "$(id -u)" -eq 0 ] || unavailable "debootstrap needs root to create $base"
    root=$(mktemp -d "$pdir/.rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    log "debootstrap --variant=minbase bookworm (about 30 s) from $mirror"
    debootstrap --variant=minbase bookworm "$root" "$mirror" > "$pdir/debootstrap.log" 2>&1 \
      || { log "debootstrap failed; see $pdir/debootstrap.log"; exit 1; }
    # Make it look like the official slim image: same apt sources (incl. updates and security),
    # no docs/man/locales on later installs, no apt caches.
    rm -f "$root/etc/apt/sources.list"
    cat > "$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
    printf '%s\n' 'APT::Install-Recommends "false";' > "$root/etc/apt/apt.conf.d/docker-no-recommends"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
      "$root"/var/log/* "$root"/tmp/* "$root/debootstrap"
    tar --numeric-owner -C "$root" -cf "$tarball.part" .
    mv -f "$tarball.part" "$tarball"
    rm -rf "$root"; trap - EXIT
  fi
  log "importing $tarball as $base"
  podman import --change 'CMD ["bash"]' "$tarball" "$base" >/dev/null
fi
# Can a container actually start (namespaces, cgroups, runtime)?
if ! podman run --rm --network none "$base" true 2>"$pdir/podman-run.err"; then
  unavailable "'podman run $base true' failed: $(tail -n1 "$pdir/podman-run.err")"
fi

[ "$build" = 1 ] || { echo "UCE_NF_PODMAN=ok image= build_seconds=0 size_bytes=0 containers_conf=$conf"; exit 0; }

# --- 4. the pipeline image -----------------------------------------------------------------
revision=$(git -C "$here" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# "-dirty" when the image's inputs differ from that commit (uncommitted or untracked files).
inputs=(src bin pyproject.toml envs/requirements.txt containers/Dockerfile)
if [ "$revision" != unknown ] && [ -n "$(git -C "$here" status --porcelain -- "${inputs[@]}" 2>/dev/null)" ]; then
  revision=$revision-dirty
fi
args=(build --layers --network host
      -f "$here/containers/Dockerfile"
      --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
      -t "$image")
# Trust this machine's CA bundle during the build only (never baked into the image). It is
# mounted read-only at a neutral path that the Dockerfile's pip step looks for: mounting it over
# /etc/ssl/certs/ca-certificates.crt breaks the apt step (ca-certificates' postinst rewrites it).
[ -s "$ca" ] && args+=(-v "$ca:/run/uce-nf-build-ca.crt:ro")
log "building $image (podman ${args[*]:1} $* $here)"
start=$(date +%s.%N)
podman "${args[@]}" "$@" "$here" >&2
end=$(date +%s.%N)
seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
size=$(podman image inspect --format '{{.Size}}' "$image")
human=$(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }')
log "built $image in ${seconds} s; image size $human ($size bytes)"
# Drop dangling images (earlier builds of this tag, throw-away test builds): every torch layer
# is 6+ GB. The current build's cache layers are not dangling and stay. UCE_NF_PRUNE=0 keeps all.
if [ "${UCE_NF_PRUNE:-1}" = 1 ]; then
  podman image prune -f >/dev/null 2>&1 || log "warning: podman image prune failed"
fi
printf '{"image": "%s", "build_seconds": %s, "size_bytes": %s, "version": "%s", "revision": "%s"}\n' \
  "$image" "$seconds" "$size" "$version" "$revision" > "$pdir/last_build.json"
echo "UCE_NF_PODMAN=ok image=$image build_seconds=$seconds size_bytes=$size containers_conf=$conf"
