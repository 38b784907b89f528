"""`sgtm analyze moe`: forget-expert SGTM against dense SGTM and the weak filter at matched active
parameters (issue #15)."""

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
    seed_note,
    vs_text,
)
from pipeline.experiments.analyses.plots import errorbar
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    coverage_note,
    figure,
    finished,
    method_of,
    per_seed,
    sweep_status,
    value,
    write_analysis,
)
from pipeline.experiments.counts import param_counts
from pipeline.experiments.stats import (
    CONFIDENCE,
    t_interval,
)

MOE_ARMS = ("dense_sgtm", "expert_sgtm", "expert_sgtm_own_first")  # SGTM arms of configs/sweeps/moe.yaml


MOE_FILTER = "weak_filter"


MOE_COLORS = {"dense_sgtm": "tab:red", "expert_sgtm": "tab:purple", "expert_sgtm_own_first": "tab:pink",
              "weak_filter": "tab:blue"}


GAP = "ablation_gap"  # pseudo-kind: deployed (ablated, no bias) minus full, per seed


def _pending_cells(sweeps: list[str]) -> list[str]:
    """``label=value,...`` of every cell of the sweeps not finished (run output: no final.json;
    cell store: no current summary)."""
    return [",".join(f"{k}={v}" for k, v in c["labels"].items())
            for p in sweeps for c in sweep_status(p)["cells"] if not c["done"]]


def moe(sweeps: list[str], out: str, command: str) -> dict:
    """Forget-expert SGTM against dense SGTM and the weak filter at matched active parameters
    (configs/sweeps/moe.yaml, issue #15): deployed Spanish (forget) and English (retain) loss per
    method, mean and 95% interval over the seeds that finished, claims paired by seed. Leakage is
    measured here as the ablation gap (forget loss of the deployed, ablated model minus the full
    model's, no bias): how much of what the model knows of the forget set sat in the parameters
    ablation removes; ``sgtm analyze leakage`` needs weak-filter dose runs of the same architecture,
    which this sweep does not have."""
    cells = [c for c in finished(sweeps) if method_of(c) in (*MOE_ARMS, MOE_FILTER)]
    if not cells:
        raise ValueError("moe: no finished cell of " + ", ".join((*MOE_ARMS, MOE_FILTER)) + " in "
                         + ", ".join(map(str, sweeps)))
    groups = group_by(cells, method_of)
    order = [m for m in (*MOE_ARMS, MOE_FILTER) if m in groups]
    vals = {}  # method -> set -> kind -> {seed: loss}
    for m in order:
        vals[m] = {s: {k: per_seed(groups[m], lambda c, s=s, k=k: value(c, s, k)) for k in (CAL, RAW, "full")}
                   for s in ("forget", "retain")}
        for s in ("forget", "retain"):
            full = vals[m][s]["full"]
            vals[m][s][GAP] = {sd: v - full[sd] for sd, v in vals[m][s][RAW].items() if sd in full}
    rows = []
    for m in order:
        cs = groups[m]
        seeds_ = sorted(c["seed"] for c in cs)
        row = {"method": m, "seeds": len(cs), "seed_list": ",".join(map(str, seeds_)),
               "note": "no interval (1 seed): verdicts inconclusive" if len(cs) < 2 else f"{len(cs)} seeds",
               **param_counts(cs[0])}
        interval_columns(row, cs, sets=("forget", "retain"))
        if m in MOE_ARMS:
            for s in ("forget", "retain"):
                iv = t_interval(list(vals[m][s][GAP].values()))
                row[f"{s}_{GAP}"] = iv["mean"]
                row[f"{s}_{GAP}_pm"] = None if iv["lo"] is None else iv["hi"] - iv["mean"]
        rows.append(row)

    fig, (ax1, ax2, ax3) = figure(3, width=5)
    for i, m in enumerate(order):
        f, r = t_interval(list(vals[m]["forget"][CAL].values())), t_interval(list(vals[m]["retain"][CAL].values()))
        xerr = None if r["lo"] is None else [[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]]
        yerr = None if f["lo"] is None else [[f["mean"] - f["lo"]], [f["hi"] - f["mean"]]]
        ax1.errorbar([r["mean"]], [f["mean"]], xerr=xerr, yerr=yerr, fmt="o", capsize=3, color=MOE_COLORS.get(m),
                     label=f"{m} ({len(groups[m])} seed{'s' if len(groups[m]) > 1 else ''})")
        errorbar(ax2, i, vals[m]["forget"][CAL], color=MOE_COLORS.get(m))
        ax2.plot([i] * len(vals[m]["forget"][CAL]), list(vals[m]["forget"][CAL].values()), ".", color="k", alpha=0.4)
        if m in MOE_ARMS:
            for dx, s, mk in ((-0.1, "forget", "o"), (0.1, "retain", "s")):
                g = vals[m][s][GAP]
                iv = t_interval(list(g.values()))
                if iv["mean"] is not None:
                    err = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
                    ax3.errorbar([i + dx], [iv["mean"]], yerr=err, fmt=mk, capsize=3, color=MOE_COLORS.get(m),
                                 label=s if i == 0 else None)
                    ax3.plot([i + dx] * len(g), list(g.values()), ".", color="k", alpha=0.4)
    ticks = [f"{m}\n({len(groups[m])} seed{'s' if len(groups[m]) > 1 else ''})" for m in order]
    ax1.set(title="deployed model, whole held-out split\n(calibrated; 95% intervals over seeds)",
            xlabel="English (retain) loss, lower is better", ylabel="Spanish (forget) loss, higher = more removed")
    ax1.legend(fontsize=7)
    ax2.set_xticks(range(len(order)), ticks, fontsize=7)
    ax2.set(title="deployed Spanish loss (calibrated; dots: seeds)", ylabel="nats/token")
    arms = [m for m in order if m in MOE_ARMS]
    ax3.set_xticks(range(len(arms)), ticks[:len(arms)], fontsize=7)
    ax2.set_xlim(-0.5, len(order) - 0.5)
    ax3.set_xlim(-0.5, max(len(arms), 1) - 0.5)
    ax3.set(title="ablation gap: ablated - full (no bias)\no: Spanish, s: English; dots: seeds",
            ylabel="nats/token")
    ax3.legend(fontsize=7)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)

    claims = []

    def pair(a: str, b: str, s: str, kind: str) -> tuple[dict, dict]:
        """``a`` and ``b``'s per-seed values cut to the seeds both ran (paired)."""
        x, y = on_common_seeds(vals[a], vals[b])
        return x[s][kind], y[s][kind]

    def measured(a: str, b: str, s: str, kind: str = CAL) -> str:
        x, y = pair(a, b, s, kind)
        return f"{a} vs {b}: {vs_text(x, y)}"

    paper_moe = "open: the paper leaves mixture-of-experts to future work (issue #15)"
    for arm in ("expert_sgtm", "expert_sgtm_own_first"):
        if arm in vals and "dense_sgtm" in vals:
            iv, v = compare(*pair(arm, "dense_sgtm", "forget", CAL))
            claims.append(claim(f"forget experts localise better than forget units: {arm}'s deployed Spanish loss "
                                "is above dense SGTM's", paper_moe, measured(arm, "dense_sgtm", "forget"), v, diff=iv,
                                holds_uncalibrated=compare(*pair(arm, "dense_sgtm", "forget", RAW))[1]))
    for arm in MOE_ARMS:
        if arm in vals and MOE_FILTER in vals:
            iv, v = compare(*pair(arm, MOE_FILTER, "forget", CAL))
            claims.append(claim(f"{arm}'s deployed Spanish loss is above the weak filter's",
                                "SGTM > weak filter at 20% undiscovered (TinyStories, dense)",
                                measured(arm, MOE_FILTER, "forget"), v, diff=iv,
                                holds_uncalibrated=compare(*pair(arm, MOE_FILTER, "forget", RAW))[1]))
    for arm in MOE_ARMS:
        if arm in vals and MOE_FILTER in vals:
            x, y = pair(arm, MOE_FILTER, "retain", CAL)
            iv, _ = compare(x, y)
            base = t_interval(list(y.values()))["mean"]
            pct = "" if iv["mean"] is None or not base else f" ({100 * iv['mean'] / base:+.1f}% of the loss)"
            claims.append(claim(f"{arm}'s English loss minus the weak filter's (a loss increase at equal steps, not "
                                "a compute penalty)", "-", measured(arm, MOE_FILTER, "retain") + pct, None, diff=iv))
    for arm in ("expert_sgtm", "expert_sgtm_own_first"):
        if arm in vals and "dense_sgtm" in vals:
            for s, what in (("forget", "Spanish ablation gap (how much of the Spanish ability ablation removes; "
                                       "larger = less leaked into the kept parameters)"),
                            ("retain", "English ablation gap (what ablation costs English)")):
                iv, _ = compare(*pair(arm, "dense_sgtm", s, GAP))
                claims.append(claim(f"{what}: {arm} minus dense SGTM", paper_moe,
                                    measured(arm, "dense_sgtm", s, GAP), None, diff=iv))
    pending = _pending_cells(sweeps)
    name = sweep_status(sweeps[0])["sweep"]
    notes = [coverage_note(sweeps),
             "Seeds per method: " + "; ".join(f"{r['method']} {r['seeds']} ({r['seed_list']})" for r in rows)
             + ". A method with one seed has no interval and every verdict involving it is inconclusive; claims "
               "compare two methods on the seeds both ran (paired).",
             ("Pending cells (" + ", ".join(pending) + "): finish them with `sgtm sweep --config " + name
              + "` (finished cells are skipped), then rerun the command above.") if pending else
             "Every cell of the sweep finished.",
             "Matched active parameters: params_active is what a token uses (MoE: the shared expert plus its top-k "
             "routed experts; dense: the whole model), params_total every parameter; forget_mlp_params: the forget "
             "units' and forget experts' MLP parameters over all blocks. Leakage here is the ablation gap "
             "(deployed ablated model minus the full model on each set, whole held-out split, no bias), not the "
             "dose-response leakage of `sgtm analyze leakage` (it needs weak-filter dose runs of each architecture).",
             DEPLOYED_NOTE, INTERVAL_NOTE]
    c0 = cells[0]
    payload = {"title": "Forget experts (MoE) vs dense SGTM vs the weak filter", "command": command,
               "inputs": [str(s) for s in sweeps], "seeds": seed_note(groups), "table": rows, "claims": claims,
               "setup": {"undiscovered_rate": c0["undiscovered_rate"], "steps": c0["steps"],
                         "tokens": c0["tokens"], "seeds": {m: sorted(c["seed"] for c in groups[m]) for m in order},
                         "pending": pending, "confidence": CONFIDENCE},
               "notes": notes}
    write_analysis(out, "moe", payload, fig)
    return payload


register(Analysis(
    name="moe", help="forget-expert SGTM vs dense SGTM vs the weak filter at matched active parameters "
                     "(deployed losses, ablation gap, parameter counts)",
    run=on_sweeps(moe), arguments=sweep_arguments, summaries=("moe",), expected={"bilingual": ("moe",)},
    cli_order=100, report_order=90, pending_order=110))
