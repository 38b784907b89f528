"""`sgtm analyze seeds`: how far one run lands from the mean of its method, the reason every
verdict is an interval over seeds."""

from __future__ import annotations

from pipeline.experiments.analyses.claims import (
    CAL,
    group_by,
    seed_note,
)
from pipeline.experiments.analyses.plots import COLORS
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    coverage_note,
    figure,
    finished,
    method_of,
    value,
    write_analysis,
)
from pipeline.experiments.stats import (
    t_interval,
)


def seeds(sweeps: list[str], out: str, command: str) -> dict:
    """Per method, the seed-to-seed spread of the deployed forget / retain loss: how far one run
    can be from the mean (why every verdict uses an interval over seeds, not one run)."""
    cells = finished(sweeps)
    groups = group_by(cells, method_of)
    rows = []
    fig, axes = figure(2)
    for i, (m, cs) in enumerate(sorted(groups.items())):
        cs = sorted(cs, key=lambda c: c["seed"])
        row = {"method": m, "seeds": [c["seed"] for c in cs]}
        for ax, s in zip(axes, ("forget", "retain")):
            vals = [value(c, s, CAL) for c in cs]
            ax.plot([i] * len(vals), vals, "o", color=COLORS.get(m, "k"))
            iv = t_interval(vals)
            row.update({f"{s}_mean": iv["mean"], f"{s}_sd": iv["sd"],
                        f"{s}_pm": None if iv["lo"] is None else iv["hi"] - iv["mean"],
                        f"{s}_spread": float(max(vals) - min(vals))})
        rows.append(row)
    for ax, s in zip(axes, ("forget", "retain")):
        ax.set_xticks(range(len(groups)), sorted(groups), fontsize=8)
        ax.set(title=f"deployed {s} loss per seed (calibrated, whole held-out split)", ylabel="nats/token")
        ax.grid(alpha=0.3)
    payload = {"title": "Seed-to-seed spread", "command": command, "inputs": [str(s) for s in sweeps],
               "seeds": seed_note(groups), "table": rows, "claims": [],
               "notes": [coverage_note(sweeps),
                         "sd: standard deviation over seeds; pm: half-width of the 95% t-interval of the mean; "
                         "spread: max - min over seeds."]}
    write_analysis(out, "seeds", payload, fig)
    return payload


register(Analysis(
    name="seeds", help="seed-to-seed spread of the deployed losses", run=on_sweeps(seeds),
    arguments=sweep_arguments, summaries=("seeds",), expected={"bilingual": ("seeds",)},
    cli_order=70, report_order=40, pending_order=50))
