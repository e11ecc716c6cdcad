#!/usr/bin/env bash
# The load figures on one CUDA GPU (sized for one H200 in under 8 minutes), nothing downloaded:
# builds a Llama-7B-shaped random model under .bench/gpu (about 13.5 GB, reused), then prints
# the table and writes it as JSON (to $OUT/gpu.json when $OUT is set, else .bench/gpu.json).
# Exits 2 at once without CUDA. `bench/gpu.sh --cpu-test` checks the script on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
json="${OUT:-.bench}/gpu.json"
exec timeout --signal=INT --kill-after=20 480 python -m bench.gpu --json "$json" "$@"
