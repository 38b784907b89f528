"""`sgtm analyze leakage`: how many undiscovered forget tokens SGTM's kept parameters act as if
they had seen, from a dose-response of plain runs."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.experiments.analyses.claims import (
    INTERVAL_NOTE,
    claim,
    compare,
    group_by,
    seed_note,
)
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    ci_text,
    coverage_note,
    figure,
    finished,
    size_label,
    value,
    write_analysis,
)
from pipeline.experiments.counts import count_tokens
from pipeline.experiments.stats import (
    all_of,
    dose_equivalent,
    nonincreasing,
    t_interval,
    verdict,
)


def leakage(sweeps: list[str], out: str, command: str) -> dict:
    """Per model size: dose-response of plain runs (weak filter at undiscovered rate r = retain data
    plus the N forget tokens that slipped through) -> forget loss(N), pooled over seeds; each SGTM
    run's post-ablation forget loss (no bias) -> N_equivalent; leakage = N_equivalent / undiscovered
    tokens it saw; mean and 95% interval over seeds per (size, rate). Sizes are compared at one
    matched undiscovered rate only (leakage depends on the rate)."""
    cells = finished(sweeps)
    by_size = group_by(cells, lambda c: (c["d_model"], c["n_layers"], c["n_params"]))
    runs, curves = [], {}
    fig, (ax1, ax2) = figure(2)
    for (d, L, n), cs in sorted(by_size.items()):
        doses = [c for c in cs if c["strategy"] == "none" and c["filter"] == "weak"]
        sgtm = [c for c in cs if c["strategy"] == "sgtm" and c["undiscovered_rate"] > 0]
        if len(doses) < 2 or not sgtm:
            continue
        agg = defaultdict(list)
        for c in doses:
            agg[count_tokens(c)["forget_unlabelled"]].append(value(c, "forget", "full"))
        xs = sorted(agg)
        ys = [float(np.mean(agg[x])) for x in xs]
        size = size_label(cs[0])
        curves[size] = {"forget_tokens": xs, "forget_loss": ys, "dose_runs": len(doses)}
        line = ax1.plot([max(x, 1) for x in xs], ys, "o", label=f"plain + N forget tokens, {size}")[0]
        mono = nonincreasing(ys)
        for i in range(1, len(xs)):  # the interpolation actually used: linear in N from 0, in log N after
            grid = np.geomspace(max(xs[i - 1], 1), xs[i], 30)
            if xs[i - 1] <= 0:
                yy = mono[i - 1] + (mono[i] - mono[i - 1]) * grid / xs[i]
            else:
                yy = mono[i - 1] + (mono[i] - mono[i - 1]) * np.log(grid / xs[i - 1]) / np.log(xs[i] / xs[i - 1])
            ax1.plot(grid, yy, "-", color=line.get_color())
        for c in sgtm:
            tok = count_tokens(c)
            target = value(c, "forget", "deployed")  # ablated, no bias: the dose runs have no bias either
            eq = dose_equivalent(xs, ys, target)
            leak = eq["n"] / tok["forget_unlabelled"] if tok["forget_unlabelled"] else None
            runs.append({"size": size, "d_model": d, "n_layers": L, "n_params": n,
                         "undiscovered_rate": c["undiscovered_rate"], "seed": c["seed"],
                         "sgtm_forget_ablated": target, "undiscovered_tokens_seen": tok["forget_unlabelled"],
                         "n_equivalent": eq["n"], "bound": eq["bound"], "leakage": leak})
            ax1.plot([max(eq["n"], 1)], [target], "*", ms=9, color=line.get_color())
    rows = []
    for (size, rate), rs in sorted(group_by(runs, lambda r: (r["size"], r["undiscovered_rate"])).items(),
                                   key=lambda kv: (kv[1][0]["n_params"], kv[0][1])):
        iv = t_interval([r["leakage"] for r in rs])
        rows.append({"size": size, "n_params": rs[0]["n_params"], "undiscovered_rate": rate, "seeds": len(rs),
                     "leakage": iv["mean"], "leakage_pm": None if iv["lo"] is None else iv["hi"] - iv["mean"],
                     "bounds": ",".join(sorted({str(r["bound"]) for r in rs if r["bound"]})) or None})
    for size in sorted({r["size"] for r in rows}):
        rs = [r for r in rows if r["size"] == size]
        ax2.errorbar([100 * r["undiscovered_rate"] for r in rs], [max(r["leakage"] or 0, 1e-5) for r in rs],
                     yerr=[r["leakage_pm"] or 0 for r in rs], fmt="o-", capsize=3, label=size)
    ax1.set(xscale="log", title="dose-response (N = 0 drawn at 1) and SGTM runs (stars)",
            xlabel="forget tokens seen by a plain run (N)", ylabel="forget loss (no bias)")
    ax2.set(yscale="log", title="leakage = N_equivalent / undiscovered forget tokens seen (95% intervals)",
            xlabel="undiscovered forget data (%)", ylabel="leakage")
    ax2.axhspan(0.005, 0.02, color="tab:green", alpha=0.15, label="paper, 64M: 0.005-0.02")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    claims = []
    if rows:
        iv_all = [r for r in rows if r["leakage"] is not None]
        worst = max(iv_all, key=lambda r: r["leakage"] + (r["leakage_pm"] or 0)) if iv_all else None
        if worst is not None:
            per = [r["leakage"] for r in runs if r["size"] == worst["size"] and
                   r["undiscovered_rate"] == worst["undiscovered_rate"]]
            iv = t_interval(per)
            # claim: leakage <= 0.05, i.e. 0.05 - leakage > 0 with the interval of the worst cell
            hold = verdict({"lo": None if iv["lo"] is None else 0.05 - iv["hi"],
                            "hi": None if iv["hi"] is None else 0.05 - iv["lo"]})
            claims.append(claim("leakage stays at most 0.05 (two orders of magnitude below filtering's 1) at every "
                                f"size and rate measured ({len({r['size'] for r in iv_all})} size(s), "
                                f"{len({r['undiscovered_rate'] for r in iv_all})} rate(s))",
                                "0.005-0.02 at 64M for undiscovered rates up to 40%",
                                f"largest: {worst['size']} at {100 * worst['undiscovered_rate']:g}% undiscovered: "
                                f"{ci_text(iv)}", hold))
        sizes = sorted({(r["n_params"], r["size"]) for r in runs})
        rates = [rate for rate in sorted({r["undiscovered_rate"] for r in runs})
                 if all(any(r["size"] == s and r["undiscovered_rate"] == rate for r in runs) for _, s in sizes)]
        if len(sizes) > 1 and rates:
            rate = 0.2 if 0.2 in rates else rates[-1]
            by = {s: {r["seed"]: r["leakage"] for r in runs if r["size"] == s and r["undiscovered_rate"] == rate}
                  for _, s in sizes}
            steps = [compare(by[a], by[b]) for (_, a), (_, b) in zip(sizes, sizes[1:])]
            claims.append(claim(f"leakage falls with model size (sizes compared at {100 * rate:g}% undiscovered only)",
                                "8M -> 64M: falls",
                                "; ".join(f"{s}: {ci_text(t_interval(list(by[s].values())), 4)}" for _, s in sizes)
                                + "; steps: " + ", ".join(v for _, v in steps),
                                all_of(*(v for _, v in steps)), diffs=[iv for iv, _ in steps]))
    payload = {"title": "Leakage", "command": command, "inputs": [str(s) for s in sweeps], "table": rows,
               "runs": runs, "curves": curves, "claims": claims, "seeds": seed_note(
                   group_by(runs, lambda r: (r["size"], r["undiscovered_rate"]))) if runs else "0",
               "notes": [coverage_note(sweeps),
                         "N counts the forget tokens a plain run trained on (weak filter at a small undiscovered "
                         "rate), replayed from the loader; the dose-response pools the dose runs of every seed. "
                         "bound=below: SGTM forgot more than the N=0 run (leakage 0); bound=above: less than the "
                         "largest dose (leakage is then a lower bound). Losses without bias, whole held-out split.",
                         INTERVAL_NOTE]}
    write_analysis(out, "leakage", payload, fig)
    return payload


register(Analysis(
    name="leakage", help="dose-response baselines -> SGTM leakage per undiscovered rate and size",
    run=on_sweeps(leakage), arguments=sweep_arguments, summaries=("leakage",), expected={"bilingual": ("leakage",)},
    cli_order=40, report_order=50, pending_order=60))
