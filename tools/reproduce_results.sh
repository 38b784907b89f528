#!/usr/bin/env bash
# Every number in docs/results.md, in order: the sweeps, the analyses of them, the fine-tuning
# attacks and RMU, the mechanism analyses, then the report. Finished cells and analyses are not
# redone, so the script can be stopped and rerun.
#
#   tools/reproduce_results.sh                 # all stages
#   tools/reproduce_results.sh sweeps          # one stage: sweeps | analyses | attacks | mechanisms | report
#
# On a 2-core CPU the sweeps take about 2-3 minutes a cell (one thread each); run two stages'
# sweeps side by side with SGTM_CELL_THREADS=1 or submit them with `sgtm sweep --slurm`.
set -euo pipefail
cd "$(dirname "$0")/.."
SGTM=${SGTM:-.venv/bin/sgtm}
A=runs/analysis/bilingual
W=runs/analysis/wiki
STAGE=${1:-all}

cell() { $SGTM sweep --config "$1" --cell "$2"; }
want() { [[ $STAGE == all || $STAGE == "$1" ]]; }

if want sweeps; then
  for s in tradeoff seeds undiscovered leakage scaling capacity tradeoff_wiki; do $SGTM sweep --config "$s"; done
fi

if want analyses; then
  $SGTM analyze seeds --sweeps runs/sweeps/seeds --out $A
  $SGTM analyze tradeoff --sweeps runs/sweeps/tradeoff --out $A
  $SGTM analyze undiscovered --sweeps runs/sweeps/undiscovered --out $A
  $SGTM analyze leakage --sweeps runs/sweeps/undiscovered runs/sweeps/leakage runs/sweeps/scaling --out $A
  $SGTM analyze compute-penalty --sweeps runs/sweeps/scaling runs/sweeps/tradeoff --out $A
  $SGTM analyze capacity --sweeps runs/sweeps/capacity --out $A
  $SGTM analyze tradeoff --sweeps runs/sweeps/tradeoff_wiki --out $W
  $SGTM analyze classifier --sweeps runs/sweeps/tradeoff_wiki --out $W
fi

if want attacks; then
  # Bilingual: the ablated SGTM model, the filters and RMU on the no-filter model, each attacked
  # until it reaches the no-filter model's forget loss (or 200 steps).
  nofilter=$(cell tradeoff method=no_filter)
  attack=(--reference "$nofilter" --steps 200 --eval-every 10 --batch-size 8 --stop-at-target --out $A)
  [[ -f $A/attack_sgtm.analysis.json ]] || $SGTM attack --checkpoint "$(cell tradeoff method=sgtm)" --name attack_sgtm "${attack[@]}"
  [[ -f $A/attack_weak_filter.analysis.json ]] || $SGTM attack --checkpoint "$(cell tradeoff method=weak_filter)" --name attack_weak_filter "${attack[@]}"
  [[ -f $A/attack_rmu.analysis.json ]] || $SGTM rmu --checkpoint "$nofilter" --rmu-steps 100 --rmu-lr 1e-3 "${attack[@]}"
  [[ -f $A/attack_perfect_filter.analysis.json ]] || $SGTM attack \
    --checkpoint "$(cell undiscovered method=weak_filter,data.tagging.undiscovered_rate=0.0)" --name attack_perfect_filter "${attack[@]}"
  $SGTM analyze attacks --runs $A --out $A
  # Wikipedia: the same attacks on the classifier-tagged models (biology = forget)
  wnofilter=$(cell tradeoff_wiki method=no_filter)
  wattack=(--reference "$wnofilter" --steps 200 --eval-every 10 --batch-size 8 --stop-at-target --out $W)
  for m in sgtm weak_filter strict_filter; do
    [[ -f $W/attack_$m.analysis.json ]] || $SGTM attack --checkpoint "$(cell tradeoff_wiki method=$m)" --name attack_$m "${wattack[@]}"
  done
  [[ -f $W/attack_rmu.analysis.json ]] || $SGTM rmu --checkpoint "$wnofilter" --rmu-steps 100 --rmu-lr 1e-3 "${wattack[@]}"
  $SGTM analyze attacks --runs $W --out $W
fi

if want mechanisms; then
  sgtm20=$(cell tradeoff method=sgtm)
  $SGTM analyze per-token --run "$sgtm20" --out $A
  $SGTM analyze gradnorm --checkpoint "$sgtm20" --out $A
fi

if want report; then
  $SGTM report --runs runs/analysis --out docs --intro configs/sweeps/report_intro.md
fi
