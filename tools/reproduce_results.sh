#!/usr/bin/env bash
# Every number in docs/results.md (and the README's results block), in order: the sweeps (every
# cell once per seed, then its whole-split deployed evaluation), the analyses of them, the
# fine-tuning attacks and RMU per seed, the mechanism analyses, then the report, which writes one
# summary JSON per analysis to docs/results/ and renders docs/results.md from them. Finished cells,
# deployed evaluations and attacks are not redone, so the script can be stopped and rerun.
#
# Cells live in the committed cell store (docs/results/cells/<sweep>/<cell>.json, one summary per
# finished cell; docs/experiments.md "The cell store"): the sweeps stage skips every cell whose
# committed summary is current (same config hash, today's NUMERICS_VERSION), even on a machine
# that never trained it, and re-runs stale ones; the analyses read the store, not runs/. The
# attacks, mechanisms, harness and classifier stages need checkpoints, so they read runs/.
#
#   tools/reproduce_results.sh                 # all stages
#   tools/reproduce_results.sh sweeps          # one stage: sweeps | analyses | attacks | mechanisms | harness | report
#   SWEEPS="tradeoff undiscovered" tools/reproduce_results.sh sweeps   # some sweeps only
#   COMMIT_CELLS=1 tools/reproduce_results.sh sweeps   # one cell at a time (nice, one thread), each
#                                              # finished cell's summary committed as it lands
#                                              # (tools/sweep_in_background.sh)
#
# On a 2-core CPU a tiny-1m cell takes a few minutes with one thread; the headline sweeps come
# first. An analysis whose sweep has no finished cell is skipped, and the report lists it as
# pending instead of showing older numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
SGTM=${SGTM:-.venv/bin/sgtm}
A=runs/analysis/bilingual
W=runs/analysis/wiki
STAGE=${1:-all}
SEEDS=${SEEDS:-"0 1 2"}
SWEEPS=${SWEEPS:-"tradeoff undiscovered tradeoff_wiki leakage capacity scaling matched_budget joint_policy retain_fraction moe"}

CELLS=docs/results/cells
FROM=store   # where `analyze` reads cells: store (docs/results/cells/<sweep>) or runs (runs/sweeps/<sweep>)

cell() { $SGTM sweep --config "$1" --cell "$2"; }
want() { [[ $STAGE == all || $STAGE == "$1" ]]; }
src() { if [[ $FROM == runs ]]; then echo "runs/sweeps/$1"; else echo "$CELLS/$1"; fi; }
has_cells() {
  if [[ $FROM == runs ]]; then
    [[ -f runs/sweeps/$1/results.json ]] && grep -q '"done": true' "runs/sweeps/$1/results.json"
  else compgen -G "$CELLS/$1/[!_]*.json" >/dev/null; fi
}
analyze() {  # analyze NAME SWEEP... -- ARGS : runs `sgtm analyze NAME --sweeps ... ARGS` if every sweep has cells
  local name=$1; shift; local sweeps=()   # a sweep written ?NAME is optional: used when it has finished cells
  while [[ $1 != -- ]]; do
    if [[ $1 == \?* ]]; then has_cells "${1#?}" && sweeps+=("$(src "${1#?}")"); shift; continue; fi
    has_cells "$1" || { echo "[reproduce] skip $name: no finished cells in $(src "$1")"; return 0; }
    sweeps+=("$(src "$1")"); shift; done; shift
  $SGTM analyze "$name" --sweeps "${sweeps[@]}" "$@"
}
done_cell() { [[ -f "$1/final.json" ]]; }

if want sweeps; then
  for s in $SWEEPS; do
    if [[ -n ${COMMIT_CELLS:-} ]]; then tools/sweep_in_background.sh "$s" || true
    else $SGTM sweep --config "$s"; fi
  done
fi

if want analyses; then   # each NAME: pipeline/experiments/analyses/ (docs/experiments.md, "Adding an analysis")
  analyze tradeoff tradeoff '?matched_budget' -- --out $A   # + the weak filter at SGTM's retain tokens
  analyze seeds tradeoff -- --out $A
  analyze undiscovered undiscovered -- --out $A
  analyze leakage undiscovered leakage scaling -- --out $A
  analyze compute-penalty scaling tradeoff -- --out $A
  analyze compute-penalty tradeoff -- --from-history --out $A   # one size, fit on the training histories
  analyze joint-policy joint_policy -- --out $A
  analyze retain-fraction retain_fraction -- --out $A
  analyze moe moe -- --out $A   # forget experts vs dense SGTM vs the weak filter (issue #15)
  analyze capacity capacity -- --out $A
  analyze tradeoff tradeoff_wiki -- --out $W
  FROM=runs analyze classifier tradeoff_wiki -- --out $W   # re-tags the prepared data: needs runs/
fi

if want attacks; then
  # Per seed: the ablated SGTM model, the weak and the perfect filter, and RMU on the no-filter
  # model, each attacked until it reaches the no-filter model's forget loss on the same held-out
  # batches (or 200 steps).
  for seed in $SEEDS; do
    nofilter=$(cell tradeoff method=no_filter,seed=$seed)
    done_cell "$nofilter" || continue
    attack=(--reference "$nofilter" --steps 200 --eval-every 20 --batch-size 8 --stop-at-target --seed "$seed")
    for m in sgtm weak_filter; do
      c=$(cell tradeoff method=$m,seed=$seed)
      [[ -f $A/attack_${m}_s$seed.analysis.json ]] || ! done_cell "$c" || \
        $SGTM attack --checkpoint "$c" --name attack_${m}_s$seed "${attack[@]}" --out $A
    done
    c=$(cell undiscovered method=weak_filter,data.tagging.undiscovered_rate=0.0,seed=$seed)
    [[ -f $A/attack_perfect_filter_s$seed.analysis.json ]] || ! done_cell "$c" || \
      $SGTM attack --checkpoint "$c" --name attack_perfect_filter_s$seed "${attack[@]}" --out $A
    [[ -f $A/rmu_s$seed/attack_rmu.analysis.json ]] || \
      $SGTM rmu --checkpoint "$nofilter" --rmu-steps 100 --rmu-lr 1e-3 "${attack[@]}" --out $A/rmu_s$seed
  done
  ls $A/attack_*.analysis.json >/dev/null 2>&1 && $SGTM analyze attacks --runs $A --out $A
  # Wikipedia: the same attacks on the classifier-tagged models (biology = forget)
  for seed in $SEEDS; do
    wnofilter=$(cell tradeoff_wiki method=no_filter,seed=$seed)
    done_cell "$wnofilter" || continue
    wattack=(--reference "$wnofilter" --steps 200 --eval-every 20 --batch-size 8 --stop-at-target --seed "$seed")
    for m in sgtm weak_filter strict_filter; do
      c=$(cell tradeoff_wiki method=$m,seed=$seed)
      [[ -f $W/attack_${m}_s$seed.analysis.json ]] || ! done_cell "$c" || \
        $SGTM attack --checkpoint "$c" --name attack_${m}_s$seed "${wattack[@]}" --out $W
    done
    # RMU at the bilingual setting (lr 1e-3, alpha 100) left the biology loss within a hundredth of
    # a nat of no filter's here, leaving nothing to attack; at lr 1e-2 with a retain weight of 10 it
    # starts about as far above the target as SGTM (the wiki attacks table), so the attacks compare
    # like with like.
    [[ -f $W/rmu_s$seed/attack_rmu.analysis.json ]] || \
      $SGTM rmu --checkpoint "$wnofilter" --rmu-steps 100 --rmu-lr 1e-2 --alpha 10 "${wattack[@]}" --out $W/rmu_s$seed
  done
  ls $W/attack_*.analysis.json >/dev/null 2>&1 && $SGTM analyze attacks --runs $W --out $W
fi

if want mechanisms; then
  sgtm20=$(cell tradeoff method=sgtm,seed=0)
  if done_cell "$sgtm20"; then
    $SGTM analyze per-token --run "$sgtm20" --out $A
    $SGTM analyze gradnorm --checkpoint "$sgtm20" --out $A
  fi
fi

if want harness; then
  # lm-evaluation-harness accuracy (offline) of every finished trade-off cell's deployed model on
  # multiple-choice tasks made from the held-out split; cached per cell (<run_dir>/harness.json).
  FROM=runs analyze harness tradeoff -- --out $A --max-items 300   # exports checkpoints: needs runs/
  FROM=runs analyze harness tradeoff_wiki -- --out $W --max-items 300  # biology / other leads
fi

if want report; then
  $SGTM report --runs runs/analysis --out docs --intro configs/sweeps/report_intro.md --readme README.md
fi
