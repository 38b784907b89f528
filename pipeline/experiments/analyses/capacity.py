"""`sgtm analyze capacity`: deployed forget / retain loss against the forget MLP units and heads."""

from __future__ import annotations

from pipeline.experiments.analyses.claims import (
    DEPLOYED_NOTE,
    group_by,
    interval_columns,
    seed_note,
)
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    coverage_note,
    figure,
    finished,
    write_analysis,
)


def capacity(sweeps: list[str], out: str, command: str) -> dict:
    cells = [c for c in finished(sweeps) if "capacity" in c["labels"]]
    groups = group_by(cells, lambda c: c["labels"]["capacity"])
    rows = [interval_columns({"capacity": k, "seeds": len(cs)}, cs, sets=("forget", "retain"))
            for k, cs in groups.items()]
    rows.sort(key=lambda r: (r["capacity"][-2:], int(r["capacity"][1:].split("_")[0])))
    fig, (ax1, ax2) = figure(2)
    for h in sorted({r["capacity"].split("_")[1] for r in rows}):
        rs = [r for r in rows if r["capacity"].endswith(h)]
        x = [int(r["capacity"][1:].split("_")[0]) for r in rs]
        for ax, s in ((ax1, "forget"), (ax2, "retain")):
            err = [r.get(f"{s}_cal_pm") or 0 for r in rs]
            ax.errorbar(x, [r[f"{s}_cal"] for r in rs], yerr=err, fmt="o-", capsize=3, label=f"{h[1:]} forget head(s)")
    ax1.set(title="forget loss after removal (calibrated)", xlabel="forget MLP units per block", xscale="log")
    ax2.set(title="retain loss after removal (calibrated)", xlabel="forget MLP units per block", xscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    payload = {"title": "Forget capacity (MLP units x heads)", "command": command,
               "inputs": [str(s) for s in sweeps], "seeds": seed_note(groups), "table": rows, "claims": [],
               "notes": [coverage_note(sweeps), DEPLOYED_NOTE]}
    write_analysis(out, "capacity", payload, fig)
    return payload


register(Analysis(
    name="capacity", help="forget loss vs forget MLP units and heads", run=on_sweeps(capacity),
    arguments=sweep_arguments, summaries=("capacity",), expected={"bilingual": ("capacity",)},
    cli_order=30, report_order=100, pending_order=80))
