#!/usr/bin/env bash
# Issue 7's GPU numbers in one prepared run, for a session lent a device machine.
#
#   bash benchmarks/gpu_check.sh REFERENCE_SRC [decode|pipeline|all]
#
# REFERENCE_SRC: a metavoice-src checkout (its fam/ folder), carried to the machine in an
# ignored folder of the repo. Output goes to $OUT (the device tool's folder) or ./gpu_out.
# Stage-1 decode at the released 1.2B shape, bfloat16, batch 1 and 8, ours and the reference
# (torch.compile, as its build_model sets up a GPU), then the pipeline at the released shapes
# with bfloat16 first-stage weights. Written and tried on the CPU (tiny shapes); not yet run
# on a GPU. Record the card, tokens/s and RTF in benchmarks/RESULTS.md.
set -euo pipefail
ref=${1:?usage: gpu_check.sh REFERENCE_SRC [decode|pipeline|all]}
what=${2:-all}
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c 'import jax; print(jax.devices())' | tee "$out/devices.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/devices.txt" || true
if [[ $what == decode || $what == all ]]; then
  python3 -m benchmarks.decode --config full --batch 1 8 --tokens 256 --repeats 2 --dtype bfloat16 \
    --reference-src "$ref" --reference-device cuda --reference-compile --reference-tokens 256 \
    2>&1 | tee "$out/decode_gpu.txt"
fi
if [[ $what == pipeline || $what == all ]]; then
  python3 -m benchmarks.pipeline --config released --seconds 4 --repeats 2 --quantize bf16 \
    2>&1 | tee "$out/pipeline_gpu.txt"
fi
