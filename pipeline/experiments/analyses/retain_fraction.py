"""`sgtm analyze retain-fraction`: SGTM's deployed losses against the share of confident-retain
documents put in RETAIN mode."""

from __future__ import annotations

from pipeline.experiments.analyses.claims import (
    CAL,
    DEPLOYED_NOTE,
    INTERVAL_NOTE,
    RAW,
    claim,
    compare,
    group_by,
    interval_columns,
    on_common_seeds,
    per_seed_losses,
    seed_note,
    vs_text,
)
from pipeline.experiments.analyses.plots import axis_plot
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    coverage_note,
    figure,
    finished,
    write_analysis,
)
from pipeline.experiments.stats import (
    CONFIDENCE,
)


def retain_fraction(sweeps: list[str], out: str, command: str) -> dict:
    """SGTM's deployed forget / retain loss against the share of confident-retain documents put in
    RETAIN mode (``data.tagging.retain_fraction``): retain-mode tokens never reach the forget
    parameters, so more of them should leave less English in what ablation removes."""
    cells = [c for c in finished(sweeps) if c["strategy"] == "sgtm" and c.get("retain_fraction") is not None]
    if not cells:
        raise ValueError("retain-fraction: no finished SGTM cell with a retain_fraction in " + ", ".join(sweeps))
    groups = group_by(cells, lambda c: float(c["retain_fraction"]))
    xs = sorted(groups)
    rows = [interval_columns({"retain_fraction": x, "seeds": len(groups[x])}, groups[x], sets=("forget", "retain"))
            for x in xs]
    fig, axes = figure(2)
    axis_plot(axes, xs, groups, "share of confident-English documents in retain mode", categorical=False)
    vals = per_seed_losses(groups, xs)
    claims = []
    if len(xs) >= 2:
        lo, hi = xs[0], xs[-1]
        vals[lo], vals[hi] = on_common_seeds(vals[lo], vals[hi])
        iv, v = compare(vals[lo]["retain"][CAL], vals[hi]["retain"][CAL])
        claims.append(claim(f"more retain-mode data lowers SGTM's deployed retain loss (ablation removes less "
                            f"English): retain loss at retain_fraction {lo:g} above the one at {hi:g}",
                            "retain mode on 10-25% of retain data (no sweep reported)",
                            f"{lo:g} vs {hi:g}: " + vs_text(vals[lo]["retain"][CAL], vals[hi]["retain"][CAL]), v,
                            diff=iv, holds_uncalibrated=compare(vals[lo]["retain"][RAW], vals[hi]["retain"][RAW])[1]))
        ivf, _ = compare(vals[hi]["forget"][CAL], vals[lo]["forget"][CAL])
        claims.append(claim(f"forget loss at retain_fraction {hi:g} minus at {lo:g}", "-",
                            f"{hi:g} vs {lo:g}: " + vs_text(vals[hi]["forget"][CAL], vals[lo]["forget"][CAL]),
                            None, diff=ivf))
    payload = {"title": "Retain-mode fraction (SGTM)", "command": command, "inputs": [str(s) for s in sweeps],
               "seeds": seed_note(groups), "table": rows, "claims": claims,
               "setup": {"undiscovered_rate": cells[0]["undiscovered_rate"], "steps": cells[0]["steps"],
                         "confidence": CONFIDENCE},
               "notes": [coverage_note(sweeps),
                         "retain_fraction: the probability that a confidently-English document is put in RETAIN mode "
                         "(forward and backward without the forget parameters); the others stay UNLABELLED and "
                         "update every parameter. Claims compare the two ends on the seeds both ran (paired).",
                         DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "retain_fraction", payload, fig)
    return payload


register(Analysis(
    name="retain-fraction", help="SGTM's deployed losses against the retain-mode fraction",
    run=on_sweeps(retain_fraction), arguments=sweep_arguments, summaries=("retain_fraction",),
    expected={"bilingual": ("retain_fraction",)}, cli_order=90, report_order=80, pending_order=100))
