"""`sgtm analyze undiscovered`: deployed forget / retain loss against the undiscovered rate, SGTM
against the weak filter at each rate (paper Fig. 3)."""

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
    seed_note,
)
from pipeline.experiments.analyses.plots import COLORS
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    ci_text,
    coverage_note,
    diff_text,
    figure,
    finished,
    method_of,
    per_seed,
    value,
    write_analysis,
)
from pipeline.experiments.stats import (
    diff_interval,
    t_interval,
)


def undiscovered(sweeps: list[str], out: str, command: str) -> dict:
    cells = finished(sweeps)
    groups = group_by(cells, lambda c: (method_of(c), c["undiscovered_rate"]))
    vals = {k: {s: per_seed(cs, lambda c, s=s: value(c, s, CAL)) for s in ("forget", "retain")}
            for k, cs in groups.items()}
    raw = {k: {s: per_seed(cs, lambda c, s=s: value(c, s, RAW)) for s in ("forget", "retain")}
           for k, cs in groups.items()}
    rows = [interval_columns({"method": m, "undiscovered_rate": r, "seeds": len(cs)}, cs, sets=("forget", "retain"))
            for (m, r), cs in sorted(groups.items())]
    fig, (ax1, ax2) = figure(2)
    for m in sorted({m for m, _ in groups}):
        for ax, s in ((ax1, "forget"), (ax2, "retain")):
            pts = sorted((r, t_interval(list(vals[(m, r)][s].values()))) for mm, r in groups if mm == m)
            x = [100 * r for r, _ in pts]
            y = [iv["mean"] for _, iv in pts]
            err = [[iv["mean"] - iv["lo"] if iv["lo"] is not None else 0 for _, iv in pts],
                   [iv["hi"] - iv["mean"] if iv["hi"] is not None else 0 for _, iv in pts]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=COLORS.get(m), label=m)
    ax1.set(title="forget loss of the deployed model (calibrated; 95% intervals)",
            xlabel="undiscovered forget data (%)",
            ylabel="nats/token (higher = more removed)")
    ax2.set(title="retain loss of the deployed model (calibrated)", xlabel="undiscovered forget data (%)",
            ylabel="nats/token")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    claims = []
    sg = sorted(r for m, r in groups if m == "sgtm")
    wf = sorted(r for m, r in groups if m == "weak_filter")

    def txt(a, b, s="forget"):
        ia, ib = t_interval(list(vals[a][s].values())), t_interval(list(vals[b][s].values()))
        return f"{ci_text(ia)} vs {ci_text(ib)}; {diff_text(diff_interval(vals[a][s], vals[b][s]))}"

    for rate in sorted(set(sg) & set(wf)):
        if rate == 0:
            continue
        a, b = ("sgtm", rate), ("weak_filter", rate)
        iv, v = compare(vals[a]["forget"], vals[b]["forget"])
        claims.append(claim(f"SGTM forgets more than the weak filter at {100 * rate:g}% undiscovered",
                            "yes at every rate up to 40% (TinyStories 64M)", txt(a, b), v, diff=iv,
                            holds_uncalibrated=compare(raw[a]["forget"], raw[b]["forget"])[1]))
    if 0.0 in wf and 0.2 in sg:
        a, b = ("sgtm", 0.2), ("weak_filter", 0.0)
        iv, v = compare(vals[a]["forget"], vals[b]["forget"])
        claims.append(claim("SGTM at 20% undiscovered forgets at least as much as perfect filtering (forget loss above "
                            "the 0%-undiscovered filter's)", "close to the 0%-undiscovered filter",
                            txt(a, b), v, diff=iv, holds_uncalibrated=compare(raw[a]["forget"], raw[b]["forget"])[1]))
    small = [r for r in wf if 0 < r <= 0.05]
    if 0.0 in wf and small:
        a, b = ("weak_filter", 0.0), ("weak_filter", small[0])
        iv, v = compare(vals[a]["forget"], vals[b]["forget"])
        claims.append(claim("filtering loses effect as soon as a little forget data slips through: the filter's "
                            f"forget loss at {100 * small[0]:g}% undiscovered is below its loss at 0%",
                            "forget loss drops sharply at small undiscovered rates", txt(a, b), v, diff=iv))
    if 0.0 in wf and 0.0 in sg:
        a, b = ("sgtm", 0.0), ("weak_filter", 0.0)
        iv, _ = compare(vals[a]["retain"], vals[b]["retain"])
        base = t_interval(list(vals[b]["retain"].values()))["mean"]
        pct = "" if iv["mean"] is None else f" ({100 * iv['mean'] / base:+.1f}% of the loss)"
        claims.append(claim("SGTM's retain loss against the perfect filter's at 0% undiscovered (a loss increase; the "
                            "filter trains on more English tokens at equal steps)", "a small retain cost",
                            txt(a, b, "retain") + pct, None, diff=iv))
    payload = {"title": "Undiscovered forget data (paper Fig. 3)", "command": command,
               "inputs": [str(s) for s in sweeps], "seeds": seed_note(groups), "table": rows, "claims": claims,
               "notes": [coverage_note(sweeps), DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "undiscovered", payload, fig)
    return payload


register(Analysis(
    name="undiscovered", help="forget/retain loss vs undiscovered rate (paper Fig. 3)", run=on_sweeps(undiscovered),
    arguments=sweep_arguments, summaries=("undiscovered",), expected={"bilingual": ("undiscovered",)},
    cli_order=20, report_order=30, pending_order=40))
