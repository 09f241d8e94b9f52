#!/usr/bin/env bash
# Create the GeNN export environment (docs/gpu.md) with a GeNN 4.x in it; default DIR .venv-genn.
#
#     bash envs/make-genn-env.sh [DIR]                                   # GeNN from GENN_PATH
#     bash envs/make-genn-env.sh [DIR] --genn-tarball genn-4.9.0.tar.gz  # or GENN_TARBALL=FILE
#
# Python side: brian2genn 1.7, Brian2 2.5, numpy < 2 (envs/genn-requirements.txt, through
# envs/make-env.sh genn DIR). GeNN side, at DIR/genn, where protocols.export_genn finds it
# (a GENN_PATH set when the export runs takes precedence):
#   - GENN_PATH set: that GeNN 4.x (conda's brian-team channel or a git checkout) is linked as
#     DIR/genn; libgenn and the CPU backend are built in it if they are missing;
#   - else a GeNN 4.x source tarball (--genn-tarball FILE or GENN_TARBALL=FILE; a `git archive`
#     of a release such as genn-4.9.0.tar.gz), checked against a SHA256SUMS beside it when one
#     lists it, unpacked into DIR/genn and built;
#   - else an earlier DIR/genn is kept; without one the environment only generates projects.
# Nothing is downloaded for GeNN. Built: libgenn and the single-threaded CPU backend, plus the
# CUDA backend when CUDA_PATH is set (GeNN's own rule), with make -j$GENN_JOBS (default: the
# number of cores). A tarball build is reused while the tarball's SHA-256 and the backends are
# unchanged (stamp DIR/genn/.lee2018-genn).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir=""
tarball="${GENN_TARBALL:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --genn-tarball) tarball="${2:?--genn-tarball needs a file}"; shift 2 ;;
    --genn-tarball=*) tarball="${1#*=}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "make-genn-env.sh: unknown option $1 (see bash envs/make-genn-env.sh --help)" >&2
        exit 2 ;;
    *) dir="$1"; shift ;;
  esac
done
dir="${dir:-$repo/.venv-genn}"

bash "$repo/envs/make-env.sh" genn "$dir"
dir="$(cd "$dir" && pwd)"
genn="$dir/genn"
jobs="${GENN_JOBS:-$(nproc 2>/dev/null || echo 2)}"
backends="single_threaded_cpu"
if [ -n "${CUDA_PATH:-}" ]; then backends="$backends cuda"; fi

check_version() {  # $1 = GeNN root
  local v
  v="$(cat "$1/version.txt" 2>/dev/null || true)"
  case "$v" in
    4.*) echo "$v" ;;
    *) echo "make-genn-env.sh: $1 is not GeNN 4.x (version.txt: '${v:-missing}'); brian2genn" \
            "1.7 needs GeNN 4 (>= 4.2.1): use a 4.x release (git checkout 4.9.0)" >&2
       exit 1 ;;
  esac
}

build_genn() {  # $1 = GeNN root; prints the build time
  local t0=$SECONDS
  : >"$dir/genn-build.log"
  for b in libgenn $backends; do
    make -s -j"$jobs" -C "$1" "$b" >>"$dir/genn-build.log" 2>&1 || {
      echo "make-genn-env.sh: building GeNN's $b in $1 failed; see $dir/genn-build.log" >&2
      exit 1; }
  done
  echo "make-genn-env.sh: built GeNN ($backends) in $1 in $((SECONDS - t0)) s (make -j$jobs)"
}

if [ -n "${GENN_PATH:-}" ]; then
  root="$(cd "$GENN_PATH" 2>/dev/null && pwd)" || {
    echo "make-genn-env.sh: GENN_PATH=$GENN_PATH does not exist; point it at a GeNN 4.x" \
         "checkout or conda install (or unset it and give --genn-tarball FILE)" >&2; exit 1; }
  [ -x "$root/bin/genn-buildmodel.sh" ] || {
    echo "make-genn-env.sh: GENN_PATH=$root has no bin/genn-buildmodel.sh; point it at the" \
         "GeNN 4.x root folder" >&2; exit 1; }
  version="$(check_version "$root")"
  if [ ! -f "$root/lib/libgenn.a" ] || [ ! -f "$root/lib/libgenn_single_threaded_cpu_backend.a" ]; then
    [ -w "$root" ] || { echo "make-genn-env.sh: GeNN at $root is not built and not writable;" \
                             "run make in it as its owner" >&2; exit 1; }
    build_genn "$root"
  fi
  if [ "$(readlink "$genn" 2>/dev/null || true)" != "$root" ]; then
    rm -rf "$genn"
    ln -s "$root" "$genn"
  fi
  echo "make-genn-env.sh: GeNN $version from GENN_PATH, linked as $genn"
elif [ -n "$tarball" ]; then
  [ -f "$tarball" ] || { echo "make-genn-env.sh: GeNN tarball $tarball not found; give the" \
                              "path of a GeNN 4.x source tarball (e.g. genn-4.9.0.tar.gz)" >&2
                         exit 1; }
  tarball="$(cd "$(dirname "$tarball")" && pwd)/$(basename "$tarball")"
  sha="$(sha256sum "$tarball" | cut -d' ' -f1)"
  sums="$(dirname "$tarball")/SHA256SUMS"
  if [ -f "$sums" ] && grep -q " $(basename "$tarball")\$" "$sums"; then
    grep -q "^$sha  $(basename "$tarball")\$" "$sums" || {
      echo "make-genn-env.sh: $tarball does not match its SHA-256 in $sums; fetch it again" >&2
      exit 1; }
  fi
  stamp="$sha $backends"
  if [ ! -L "$genn" ] && [ -f "$genn/.lee2018-genn" ] && \
     [ "$(cat "$genn/.lee2018-genn")" = "$stamp" ]; then
    echo "make-genn-env.sh: GeNN $(cat "$genn/version.txt") in $genn is up to date with $(basename "$tarball")"
  else
    rm -rf "$genn" "$genn.unpack"
    mkdir -p "$genn.unpack"
    tar -xzf "$tarball" -C "$genn.unpack"
    top="$(find "$genn.unpack" -mindepth 1 -maxdepth 1)"
    if [ "$(echo "$top" | wc -l)" -ne 1 ] || [ ! -d "$top" ]; then
      echo "make-genn-env.sh: $tarball does not hold one top-level GeNN folder" >&2; exit 1
    fi
    mv "$top" "$genn"
    rmdir "$genn.unpack"
    check_version "$genn" >/dev/null
    build_genn "$genn"
    echo "$stamp" >"$genn/.lee2018-genn"
  fi
elif [ -x "$genn/bin/genn-buildmodel.sh" ]; then
  echo "make-genn-env.sh: keeping GeNN $(cat "$genn/version.txt" 2>/dev/null || echo '?') in $genn"
else
  echo "make-genn-env.sh: no GeNN given, so $dir only generates GeNN projects; to build and" \
       "run them, re-run with GENN_PATH=<GeNN 4.x checkout> or --genn-tarball <genn-4.x.tar.gz>" >&2
fi
echo "$dir"
