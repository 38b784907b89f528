#!/usr/bin/env bash
# Train a sweep's cells one at a time, politely (nice 19, one thread per cell), and commit each
# finished cell's summary (docs/results/cells/<sweep>/) as it lands, so a sweep spans any number of
# sittings and machines: cells whose committed summary is current are skipped, stale ones re-run.
#
#   nohup tools/sweep_in_background.sh undiscovered > runs/undiscovered.bg.log 2>&1 &
#   tools/sweep_in_background.sh undiscovered method=sgtm seed=0     # only cells matching a selector
#   NO_COMMIT=1 tools/sweep_in_background.sh capacity                # write summaries, commit nothing
#
# Only the sweep's store directory is ever committed, by path:
#   git add -- docs/results/cells/<sweep> && git commit -m "cells: <sweep> <cell>" -- docs/results/cells/<sweep>
# so other work in the tree (staged or not) stays out of these commits. Nothing is pushed. Stop it
# with `kill <pid>`: the cell in training resumes from its last checkpoint on the next start.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${1:?usage: tools/sweep_in_background.sh SWEEP [SELECTOR...]}
shift
SGTM=${SGTM:-.venv/bin/sgtm}
PY=${PY:-.venv/bin/python}
STORE=${STORE:-docs/results/cells}
export OMP_NUM_THREADS=1 SGTM_CELL_THREADS=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
only=()
[[ $# -gt 0 ]] && only=(--only "$@")
name=$($PY -c 'import sys; from pipeline.experiments.sweep import load_sweep; print(load_sweep(sys.argv[1])["name"])' "$SWEEP")
dir=$STORE/$name

commit() {  # commit the sweep's store directory, nothing else (retried while another git holds the index)
  [[ -z ${NO_COMMIT:-} && -d $dir ]] || return 0
  local i
  for i in $(seq 1 20); do
    if git add -- "$dir" 2>/dev/null; then
      if git diff --cached --quiet -- "$dir"; then return 0; fi
      git commit -q -m "cells: $name $1" -- "$dir" && { echo "[bg] committed: cells: $name $1"; return 0; }
    fi
    sleep 5
  done
  echo "[bg] could not commit $dir (git index busy?); the summaries stay in the tree" >&2
}

say() { echo "[bg $(date '+%F %T')] $*"; }

# cells that need no training: finished run dirs of today's numerics, identical cells of other sweeps
nice -n 19 "$SGTM" sweep --config "$SWEEP" --store "$STORE" --store-only "${only[@]}" || true
commit "stored without training"
mapfile -t cells < <(nice -n 19 "$SGTM" sweep --config "$SWEEP" --store "$STORE" --pending "${only[@]}")
say "$name: ${#cells[@]} cells to train"
failed=()
for sel in "${cells[@]}"; do
  [[ -n $sel ]] || continue
  say "start $sel"
  t0=$SECONDS
  if nice -n 19 "$SGTM" sweep --config "$SWEEP" --store "$STORE" --only "$sel"; then
    say "done $sel in $((SECONDS - t0)) s"
    commit "$sel"
  else
    say "FAILED $sel (see the cell's train.log; the next start retries it)"
    failed+=("$sel")
  fi
done
say "$name: $(( ${#cells[@]} - ${#failed[@]} )) of ${#cells[@]} cells trained this sitting"
[[ ${#failed[@]} -eq 0 ]] || { printf '[bg] failed: %s\n' "${failed[@]}"; exit 1; }
