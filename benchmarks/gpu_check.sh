#!/usr/bin/env bash
# The GPU numbers in one prepared run, for a session lent a device machine (at most ~8.5 minutes).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--reference-src DIR] [decode|engine|pipeline|all]
#
# Python: the project's own environment, never whatever python3 comes first on PATH:
#   $MVJAX_PYTHON if set; else .venv/bin/python in the repo; else, when the repo holds wheels in
#   .whl/ (the device tool's way to carry packages a machine lacks), a venv made at .venv over the
#   machine's python3 (--system-site-packages: its jax with the CUDA plugin), the wheels and this
#   checkout installed into it without an index. It must import mvjax from this checkout.
# It stops at once, with one line, when JAX sees no GPU (unless --dry-run).
# Steps, each under what is left of the overall limit (GPU_CHECK_LIMIT_S, default 510 s):
#   decode    stage-1 decode at the released 1.2B shape: bf16 weights and compute, then int8 weights
#             (bf16 compute), each at batch 1 and 64;
#   engine    the continuous-batching engine at the released shape with 64 slots (bf16 weights and
#             KV cache), a Poisson load of 96 requests;
#   pipeline  the whole pipeline at the released shapes (bf16 first-stage weights, EnCodec decoder).
# --reference-src DIR (a metavoice-src checkout) adds the reference's compiled decode to the
# decode step; nothing else needs it.
# --dry-run: the same sequence on the CPU with the tiny shapes (tests/test_gpu_check.py runs it).
# Output: every step's log in $OUT (the device tool's folder) or ./gpu_out, and at the end the
# machine-readable lines (decode ..., engine ..., pipeline ...) of all steps.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
dry=0
ref=""
what=all
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    --reference-src) ref=${2:?--reference-src needs a directory}; shift ;;
    decode|engine|pipeline|all) what=$1 ;;
    *) echo "gpu_check: unknown argument $1 (usage: gpu_check.sh [--dry-run] [--reference-src DIR] [decode|engine|pipeline|all])" >&2; exit 2 ;;
  esac
  shift
done
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
limit=${GPU_CHECK_LIMIT_S:-510}
start=$SECONDS
fail() { echo "gpu_check: $*" >&2; exit 1; }

# --- the project's environment ---
py=${MVJAX_PYTHON:-}
if [[ -z $py && -x .venv/bin/python ]]; then
  py=.venv/bin/python
elif [[ -z $py && -d .whl ]]; then
  echo "gpu_check: making .venv over $(command -v python3) with the wheels in .whl/"
  python3 -m venv --system-site-packages .venv || fail "could not make .venv"
  .venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl \
    || fail "could not install the wheels in .whl/"
  .venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || fail "could not install this checkout into .venv"
  py=.venv/bin/python
fi
[[ -n $py ]] || fail "no project environment: set MVJAX_PYTHON, make .venv (pip install -e '.[test]'), or carry wheels in .whl/"
problem=$("$py" - "$repo" 2>&1 <<'EOF'
import os, sys
try:
    import mvjax
    import mvjax.inference.pipeline  # noqa: F401 - jax, flax, orbax and the rest come in with it
except ImportError as exc:
    sys.exit(f"it lacks the project's packages ({exc})")
here = os.path.realpath(sys.argv[1])
where = os.path.realpath(os.path.dirname(mvjax.__file__))
if not where.startswith(here + os.sep):
    sys.exit(f"it imports mvjax from {where}, not from this checkout {here}")
EOF
) || fail "$py: ${problem##*$'\n'}"

# --- the device ---
platform=$("$py" -c 'import jax; print(jax.default_backend())' 2>"$out/jax_devices.err") \
  || fail "JAX failed to start (see $out/jax_devices.err)"
if [[ $dry -eq 0 && $platform != gpu ]]; then
  echo "gpu_check: JAX sees no GPU (default backend: $platform); stopping"
  exit 3
fi
{ "$py" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} 2>&1 | tee "$out/devices.txt"

# --- the steps ---
if [[ $dry -eq 1 ]]; then
  full=tiny; released=tiny; tokens=8; batches="1 4"; slots=4; requests=6; rate=20; lo=4; hi=12; seconds=0.5
else
  full=full; released=released; tokens=256; batches="1 64"; slots=64; requests=96; rate=20; lo=64; hi=256; seconds=4
fi
status=0
step() {  # step NAME ARGS...: one benchmark under the time left, its log in $out/NAME.txt
  local name=$1; shift
  local left=$(( limit - (SECONDS - start) ))
  if (( left < 20 )); then
    echo "gpu_check: $name skipped: the time limit is used up" | tee "$out/$name.txt"; status=1; return
  fi
  echo "gpu_check: $name ($left s left)"
  timeout --kill-after=10 "$left" "$py" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  if (( rc != 0 )); then
    echo "gpu_check: $name failed (exit $rc); the end of its log:"; tail -n 15 "$out/$name.txt"; status=1
  fi
}
refargs=()
[[ -n $ref ]] && refargs=(--reference-src "$ref" --reference-device cuda --reference-compile)
if [[ $what == decode || $what == all ]]; then
  # shellcheck disable=SC2086
  step decode_bf16 -m benchmarks.decode --config $full --batch $batches --tokens $tokens --repeats 2 \
    --dtype bfloat16 "${refargs[@]}"
  # shellcheck disable=SC2086
  step decode_int8 -m benchmarks.decode --config $full --batch $batches --tokens $tokens --repeats 2 \
    --dtype bfloat16 --quantize int8
fi
if [[ $what == engine || $what == all ]]; then
  step engine -m benchmarks.engine --configs $full --modes engine --concurrency $slots --requests $requests \
    --rate $rate --min-tokens $lo --max-tokens $hi --quantize bf16 --kv-cache bf16 --kv-caches ""
fi
if [[ $what == pipeline || $what == all ]]; then
  step pipeline -m benchmarks.pipeline --config $released --seconds $seconds --repeats 1 --quantize bf16 \
    --decoder encodec
fi
echo "# machine lines ($(( SECONDS - start )) s in all)"
cat "$out"/decode_*.txt "$out"/engine.txt "$out"/pipeline.txt 2>/dev/null \
  | grep -E '^(decode|decode-reference|engine|engine-devices|pipeline) ' || true
exit $status
