#!/usr/bin/env bash
# The parallelism issue's GPU checks in one run (about 10 minutes on one H100/H200, bf16):
#   1. the isolation invariant on the GPU at TP=1 (sgtm check-isolation, 20 steps, wiki-125m shape);
#   2. SGTM / none tokens/s and MFU at 125M, 254M and 1B (tools/bench_gpu.sh);
#   3. peak memory of the Llama-3-8B shape against tools/memory_estimate.py (blocks halved until the
#      estimate fits the card; the table says how many were kept).
# Figures: runs/gpu_checks/gpu_checks.json, and the '## GPU checks' section of docs/benchmarks.md.
#
#   tools/gpu_checks.sh                      # on the GPU machine (torch with CUDA, project importable)
#   tools/gpu_checks.sh --skip memory        # a subset
#   tools/gpu_checks.sh --device cpu --tiny  # the same code on CPU at tiny sizes (checks the script)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PY:-python3}
[[ -x "$ROOT/.venv/bin/python" && -z "${PY_SET:-}" ]] && PY="$ROOT/.venv/bin/python"
DOC=(--doc "$ROOT/docs/benchmarks.md")
for a in "$@"; do [[ $a == --tiny ]] && DOC=(); done   # a CPU check never edits the docs
if [[ " $* " == *" --device cpu "* ]]; then export DS_ACCELERATOR=cpu; else unset DS_ACCELERATOR; fi
cd "$ROOT"
exec "$PY" -m pipeline.bench.gpu_checks "${DOC[@]}" "$@"
