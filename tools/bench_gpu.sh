#!/usr/bin/env bash
# GPU benchmark: tokens/s and MFU of strategy `none` vs `sgtm` for the paper's 125M and 254M
# configs (configs/models/wiki-125m.yaml, wiki-254m.yaml) at bf16 on ONE H100/H200, table appended
# to docs/benchmarks.md ('## GPU'). Targets: sgtm/none tokens/s >= 0.97; MFU >= 40% at 254M.
#
# On the GPU machine (torch with CUDA already installed there; the project's wheels carried in):
#   tools/bench_gpu.sh --wheels DIR            # pip-installs DIR/*.whl with --no-deps first
#   tools/bench_gpu.sh                         # if deepspeed/megatron-core/... are already importable
# Options:
#   --python PY        interpreter (default: python3, or .venv/bin/python when present and CUDA-capable)
#   --wheels DIR       install the carried wheels (no index, no deps: torch is left alone)
#   --sizes "A B"      model fragments (default "wiki-125m wiki-254m")
#   --micro-batch N    sequences per step (default 16)      --seq-len N   (default 1024)
#   --rounds N         timed rounds, one step per strategy each (default 10)
#   --doc-mask         document-masked attention (default: plain causal, flash path)
#   --out FILE         Markdown file to append to (default docs/benchmarks.md; "-" for none)
#   --json FILE        figures as JSON (default runs/bench_gpu.json)
#   --device cpu --tiny  run the same code on CPU with tiny-1m fp32 (checks the script without a GPU;
#                      writes to --out only when given explicitly)
#   --dry-run          print the plan and the commands, run nothing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=""
WHEELS=""
SIZES="wiki-125m wiki-254m"
MICRO_BATCH=16
SEQ_LEN=1024
ROUNDS=10
DOC_MASK=0
OUT="$ROOT/docs/benchmarks.md"
OUT_GIVEN=0
JSON="$ROOT/runs/bench_gpu.json"
DEVICE=cuda
TINY=0
DRY_RUN=0

die() { echo "bench_gpu.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) need "$@"; PY="$2"; shift 2 ;;
    --wheels) need "$@"; WHEELS="$2"; shift 2 ;;
    --sizes) need "$@"; SIZES="$2"; shift 2 ;;
    --micro-batch) need "$@"; MICRO_BATCH="$2"; shift 2 ;;
    --seq-len) need "$@"; SEQ_LEN="$2"; shift 2 ;;
    --rounds) need "$@"; ROUNDS="$2"; shift 2 ;;
    --doc-mask) DOC_MASK=1; shift ;;
    --out) need "$@"; OUT="$2"; OUT_GIVEN=1; shift 2 ;;
    --json) need "$@"; JSON="$2"; shift 2 ;;
    --device) need "$@"; DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || die "--device must be cuda or cpu"
for n in "$MICRO_BATCH" "$SEQ_LEN" "$ROUNDS"; do [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: $n"; done
if [[ -z "$PY" ]]; then
  if [[ "$DEVICE" == cpu && -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
if [[ "$DEVICE" == cpu && "$OUT_GIVEN" == 0 ]]; then OUT="-"; fi   # a CPU check never edits the docs by default

ARGS=(--device "$DEVICE" --micro-batch "$MICRO_BATCH" --seq-len "$SEQ_LEN" --rounds "$ROUNDS" --json "$JSON")
# shellcheck disable=SC2206
SIZE_LIST=($SIZES)
ARGS+=(--sizes "${SIZE_LIST[@]}")
[[ "$DOC_MASK" == 1 ]] && ARGS+=(--doc-mask)
[[ "$TINY" == 1 ]] && ARGS+=(--tiny)
[[ "$OUT" != "-" ]] && ARGS+=(--doc "$OUT")

if [[ "$DRY_RUN" == 1 ]]; then
  [[ -n "$WHEELS" ]] && echo "would run: $PY -m pip install --no-index --no-deps $WHEELS/*.whl"
  echo "would run: cd $ROOT && PYTHONPATH=$ROOT $PY -m pipeline.bench.gpu ${ARGS[*]}"
  cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pipeline.bench.gpu "${ARGS[@]}" --dry-run
  exit 0
fi

if [[ -n "$WHEELS" ]]; then
  compgen -G "$WHEELS/*.whl" > /dev/null || die "no wheels in $WHEELS"
  "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl
fi

if [[ "$DEVICE" == cuda ]]; then
  unset DS_ACCELERATOR   # DeepSpeed must pick its CUDA accelerator
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
else
  export DS_ACCELERATOR=cpu
fi
(cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" -c 'import deepspeed, megatron.core, pipeline.bench.gpu') \
  || die "deepspeed / megatron-core not importable with $PY (use --wheels DIR)"

mkdir -p "$(dirname "$JSON")"
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pipeline.bench.gpu "${ARGS[@]}"
if [[ "$OUT" == "-" ]]; then echo "figures: $JSON"; else echo "figures: $JSON; table appended to $OUT"; fi
