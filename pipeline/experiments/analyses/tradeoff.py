"""`sgtm analyze tradeoff`: deployed forget vs retain loss per method (mean and 95% interval over
seeds), the removable gap, the English plateau and the equal-retain-token rows; the headline
analysis of docs/results.md."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.experiments.analyses.claims import (
    CAL,
    DEPLOYED_NOTE,
    INTERVAL_NOTE,
    RAW,
    SETS,
    claim,
    compare,
    group_by,
    interval_columns,
    on_common_seeds,
    seed_note,
    vs_text,
)
from pipeline.experiments.analyses.plots import COLORS
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    ci_text,
    coverage_note,
    deployed,
    deployed_kind,
    diff_text,
    figure,
    finished,
    loss,
    method_of,
    per_seed,
    value,
    write_analysis,
)
from pipeline.experiments.counts import count_tokens
from pipeline.experiments.stats import (
    CONFIDENCE,
    all_of,
    diff_interval,
    t_interval,
)


def tradeoff(sweeps: list[str], out: str, command: str) -> dict:
    cells = finished(sweeps)
    if not cells:
        raise ValueError("tradeoff: no finished cells in " + ", ".join(map(str, sweeps)))
    groups = group_by(cells, method_of)
    fig, (ax1, ax2) = figure(2)
    rows, curves = [], {}
    vals = {}  # method -> set -> kind -> {seed: loss}
    for m, cs in sorted(groups.items()):
        vals[m] = {s: {k: per_seed(cs, lambda c, s=s, k=k: value(c, s, k)) for k in (CAL, RAW)} for s in SETS}
        rows.append(interval_columns({"method": m, "seeds": len(cs), "deployed_model":
                                       cs[0]["deployed_eval"]["deployed_model"]}, cs))
        f, r = t_interval(list(vals[m]["forget"][CAL].values())), t_interval(list(vals[m]["retain"][CAL].values()))
        xerr = None if r["lo"] is None else [[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]]
        yerr = None if f["lo"] is None else [[f["mean"] - f["lo"]], [f["hi"] - f["mean"]]]
        ax1.errorbar([r["mean"]], [f["mean"]], xerr=xerr, yerr=yerr, fmt="o", capsize=3, color=COLORS.get(m),
                     label=f"{m} ({len(cs)} seeds)")
        # training-time curves (first eval.batches held-out batches, no bias): mean and 95% band
        by_step = defaultdict(list)
        for c in cs:
            for rec in c["history"]:
                v = deployed(c, "forget", rec) if deployed_kind(c) == "full" else loss(rec, "forget", "ablated")
                if v is not None:
                    by_step[rec["step"]].append(v)
        steps = sorted(by_step)
        ivs = [t_interval(by_step[st]) for st in steps]
        curves[m] = {"step": steps, "forget_mean": [iv["mean"] for iv in ivs]}
        ax2.plot(steps, [iv["mean"] for iv in ivs], "-", color=COLORS.get(m), label=m)
        if all(iv["lo"] is not None for iv in ivs):
            ax2.fill_between(steps, [iv["lo"] for iv in ivs], [iv["hi"] for iv in ivs], color=COLORS.get(m),
                             alpha=0.2)
    ax1.set(title="deployed model, whole held-out split (calibrated; 95% intervals)",
            xlabel="retain loss (lower is better)", ylabel="forget loss (higher is better)")
    ax2.set(title="forget loss during training (first eval batches, no bias; 95% band)", xlabel="step",
            ylabel="nats/token")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    claims = []

    def vs(a, b, s, kind=CAL):
        return compare(vals[a][s][kind], vals[b][s][kind])

    def here(a, b, s):
        ia = t_interval(list(vals[a][s][CAL].values()))
        ib = t_interval(list(vals[b][s][CAL].values()))
        return f"{ci_text(ia)} vs {ci_text(ib)}; {diff_text(diff_interval(vals[a][s][CAL], vals[b][s][CAL]))}"

    headroom = None
    if "perfect_filter" in vals and "no_filter" in vals:
        # The precondition of every forget comparison: removing ALL true forget data must measurably
        # raise the forget loss; otherwise no method can be told apart from no filter at this scale.
        iv, v = vs("perfect_filter", "no_filter", "forget")
        a, b = vals["perfect_filter"]["forget"][CAL], vals["no_filter"]["forget"][CAL]
        noise = t_interval([a[k] - b[k] for k in sorted(set(a) & set(b))])["sd"]
        headroom = {"gap": iv["mean"], "lo": iv["lo"], "hi": iv["hi"], "seeds": iv["n"], "seed_sd": noise,
                    "gap_over_seed_sd": None if not noise else iv["mean"] / noise, "verdict": v}
        claims.append(claim("the setting can measure removal: the perfect (true-label) filter's deployed forget "
                            "loss is above no filter's (the removable gap)",
                            "a precondition of the comparisons, not a paper claim",
                            here("perfect_filter", "no_filter", "forget")
                            + ("" if noise is None else f"; seed-to-seed sd of the gap {noise:.3f}"),
                            v, diff=iv, holds_uncalibrated=vs("perfect_filter", "no_filter", "forget", RAW)[1]))
        headroom["methods"] = _gap_shares(vals, claims)

    papers = (("weak_filter", "SGTM > weak filter at every retain loss (TinyStories 20% undiscovered; Wikipedia)"),
              ("strict_filter", "SGTM > strict filter on Wikipedia biology"))
    for other, paper in papers:
        if "sgtm" in vals and other in vals:
            iv, v = vs("sgtm", other, "forget")
            claims.append(claim(f"SGTM's deployed forget loss is above the {other.replace('_', ' ')}'s",
                                paper, here("sgtm", other, "forget"), v, diff=iv,
                                holds_uncalibrated=vs("sgtm", other, "forget", RAW)[1]))
    if "sgtm" in vals and "gradient_routing" in vals:
        ivf, vf = vs("sgtm", "gradient_routing", "forget")
        ivr, vr = vs("gradient_routing", "sgtm", "retain")
        raw = all_of(vs("sgtm", "gradient_routing", "forget", RAW)[1], vs("gradient_routing", "sgtm", "retain", RAW)[1])
        claims.append(claim("SGTM Pareto-dominates Gradient Routing: higher forget loss AND lower retain loss",
                            "yes (TinyStories)",
                            f"forget: {here('sgtm', 'gradient_routing', 'forget')} ({vf}); "
                            f"retain: {here('sgtm', 'gradient_routing', 'retain')} (lower: {vr})",
                            all_of(vf, vr), holds_uncalibrated=raw))
    for other in ("no_filter", "weak_filter"):
        if "sgtm" in vals and other in vals:
            iv, _ = vs("sgtm", other, "retain")
            base = t_interval(list(vals[other]["retain"][CAL].values()))["mean"]
            pct = "" if iv["mean"] is None or not base else f" ({100 * iv['mean'] / base:+.1f}% of the loss)"
            claims.append(claim(f"SGTM's retain loss increase over {other.replace('_', ' ')} (a loss increase, "
                                "not a compute penalty)",
                                "the paper reports retain cost as compute: a 5% compute penalty on Wikipedia "
                                "(see Compute penalty)", here("sgtm", other, "retain") + pct, None, diff=iv))
    plateau = _plateau(groups)
    if plateau:
        claims.append(claim(f"English (retain) loss still falling at the end of training: its fall over the last "
                            f"{plateau['interval']} steps (share of its fall since step {plateau['first_step']})",
                            "the paper's TinyStories runs see ~1.2B tokens (near plateau)",
                            "; ".join(f"{m}: {ci_text(r['drop'])} nats"
                                      + (f" ({100 * r['share']:.0f}%)" if r["share"] is not None else "")
                                      for m, r in plateau["methods"].items()), None))
    matched = _matched_budget(groups, vals, claims)
    c0 = next((c for c in cells if method_of(c) == "sgtm"), cells[0])
    setup = {"n_params": c0["n_params"], "d_model": c0["d_model"], "n_layers": c0["n_layers"], "steps": c0["steps"],
             "tokens": c0["tokens"], "tokens_per_step": c0["tokens_per_step"],
             "seeds": sorted({c["seed"] for c in cells}), "undiscovered_rate": c0["undiscovered_rate"],
             "eval_tokens": {k: v["tokens"] for k, v in c0["deployed_eval"]["sets"].items()},
             "calibration": c0["deployed_eval"].get("calibration"), "confidence": CONFIDENCE,
             **{k: c0.get(k) for k in ("vocab_size", "seq_len", "lr", "retain_fraction")}}
    if plateau:
        setup["plateau"] = {**{k: v for k, v in plateau.items() if k != "methods"},
                            "methods": {m: {"retain_last_drop": r["drop"]["mean"],
                                            "retain_last_drop_lo": r["drop"]["lo"],
                                            "retain_last_drop_hi": r["drop"]["hi"], "retain_last_share": r["share"],
                                            "seeds": r["drop"]["n"]} for m, r in plateau["methods"].items()}}
    if matched:
        setup["matched_budget"] = matched
    payload = {"title": "Retain/forget trade-off", "command": command, "inputs": [str(s) for s in sweeps],
               "seeds": seed_note(groups), "setup": setup, "table": rows, "curves": curves, "claims": claims,
               "headroom": headroom, "notes": [coverage_note(sweeps), DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "tradeoff", payload, fig)
    return payload


def _gap_shares(vals: dict, claims: list) -> dict:
    """How much of the removable gap (perfect filter minus no filter, per seed) each method closes,
    and how much of its forget-loss rise is beyond its retain-loss rise.

    A method's raw forget loss is hard to read where the whole gap is half a nat; its share (0: no
    filter, 1: the true-label filter) is comparable across settings. A share above 1 is not "more
    removal than perfect": an ablated model also loses general ability, so each method also gets
    its forget-loss rise minus its retain-loss rise over no filter (per seed). Each method gets the
    claim "removes some forget knowledge" (forget loss above no filter's), the weakest claim a
    removal method must pass before it is compared with another."""
    no, perfect = vals["no_filter"]["forget"][CAL], vals["perfect_filter"]["forget"][CAL]
    no_r = vals["no_filter"]["retain"][CAL]
    shares = {}
    for m in sorted(vals):
        if m == "no_filter":
            continue
        own, own_r = vals[m]["forget"][CAL], vals[m]["retain"][CAL]
        seeds = sorted(set(own) & set(no) & set(perfect))
        iv = t_interval([(own[s] - no[s]) / (perfect[s] - no[s]) for s in seeds if perfect[s] != no[s]])
        both = sorted(set(own) & set(no) & set(own_r) & set(no_r))
        beyond = t_interval([(own[s] - no[s]) - (own_r[s] - no_r[s]) for s in both])
        shares[m] = {"share": iv["mean"], "lo": iv["lo"], "hi": iv["hi"], "seeds": iv["n"],
                     "beyond_retain": beyond["mean"], "beyond_retain_lo": beyond["lo"],
                     "beyond_retain_hi": beyond["hi"]}
        if m == "perfect_filter":
            continue
        div, v = compare(own, no)
        name = m.replace("_", " ")
        claims.append(claim(f"{name} removes some forget knowledge: its deployed forget loss is above no filter's",
                            "implied: on Wikipedia the paper's SGTM and filters raise biology loss "
                            "(compute penalty 95-99%)",
                            f"{ci_text(t_interval(list(own.values())))} vs {ci_text(t_interval(list(no.values())))}; "
                            f"{diff_text(div)}; share of the removable gap closed: {ci_text(iv)} "
                            f"(0 = no filter, 1 = perfect filter); forget rise minus retain rise: {ci_text(beyond)}",
                            v, diff=div, holds_uncalibrated=compare(vals[m]["forget"][RAW],
                                                                    vals["no_filter"]["forget"][RAW])[1]))
    return shares


def _retain_curve(cell: dict) -> dict[int, float]:
    """{step: English loss} of a cell's training-time evaluations (first eval batches, no bias),
    of the model it deploys (ablated for the methods that ablate, else the full model)."""
    kind = "ablated" if deployed_kind(cell) == "calibrated" else "full"
    return {r["step"]: v for r in cell["history"] if (v := loss(r, "retain", kind)) is not None}


def _plateau(groups: dict) -> dict | None:
    """How far English is from its plateau at the end of training, per method: the fall of the
    retain loss over the last evaluation interval (95% interval over seeds) and its share of the
    fall since the first evaluation. Needs three evaluations at the same steps in every cell."""
    methods, steps = {}, None
    for m, cs in sorted(groups.items()):
        curves = [_retain_curve(c) for c in cs]
        common = sorted(set.intersection(*(set(k) for k in curves))) if curves else []
        if len(common) < 3 or (steps is not None and common[-3:] != steps[-3:]):
            continue
        steps = common
        drops = {c["seed"]: cv[common[-2]] - cv[common[-1]] for c, cv in zip(cs, curves)}
        totals = [cv[common[0]] - cv[common[-1]] for cv in curves]
        total = float(np.mean(totals))
        methods[m] = {"drop": t_interval(list(drops.values())),
                      "share": float(np.mean(list(drops.values()))) / total if total > 0 else None}
    if not methods:
        return None
    return {"interval": steps[-1] - steps[-2], "first_step": steps[0], "last_step": steps[-1], "methods": methods}


MATCHED = "weak_filter_equal_retain_tokens"


def _retain_tokens(cell: dict) -> int:
    t = count_tokens(cell)
    return int(t["total"] - t["forget_total"])


def _matched_budget(groups: dict, vals: dict, claims: list) -> dict | None:
    """SGTM against the weak filter trained on as many retain (English) tokens as SGTM (the
    ``weak_filter_equal_retain_tokens`` cells of configs/sweeps/matched_budget.yaml; at equal steps
    the filter sees more English). Token counts replayed from the loader (``count_tokens``)."""
    if MATCHED not in vals or "sgtm" not in vals:
        return None
    sg = {c["seed"]: _retain_tokens(c) for c in groups["sgtm"]}
    wf = {c["seed"]: _retain_tokens(c) for c in groups[MATCHED]}
    ratio = [wf[s] / sg[s] for s in sorted(set(sg) & set(wf))]
    info = {"sgtm_retain_tokens": float(np.mean(list(sg.values()))),
            "filter_retain_tokens": float(np.mean(list(wf.values()))),
            "filter_steps": groups[MATCHED][0]["steps"], "sgtm_steps": groups["sgtm"][0]["steps"],
            "ratio": float(np.mean(ratio)) if ratio else None, "seeds": len(ratio)}
    if "weak_filter" in groups:
        info["filter_retain_tokens_equal_steps"] = float(np.mean([_retain_tokens(c) for c in groups["weak_filter"]]))
    tokens = (f"retain tokens: SGTM {info['sgtm_retain_tokens']:.0f} in {info['sgtm_steps']} steps, filter "
              f"{info['filter_retain_tokens']:.0f} in {info['filter_steps']} steps"
              + (f" (ratio {info['ratio']:.3f})" if ratio else ""))
    sg_vals, wf_vals = on_common_seeds(vals["sgtm"], vals[MATCHED])
    a, b = sg_vals["forget"], wf_vals["forget"]
    iv, v = compare(a[CAL], b[CAL])
    claims.append(claim("at equal retain tokens: SGTM's deployed forget loss is above the weak filter's",
                        "SGTM > weak filter at every retain loss (TinyStories 20% undiscovered)",
                        f"{vs_text(a[CAL], b[CAL])}; {tokens}", v, diff=iv,
                        holds_uncalibrated=compare(a[RAW], b[RAW])[1]))
    a, b = sg_vals["retain"], wf_vals["retain"]
    iv, _ = compare(a[CAL], b[CAL])
    eq = ""
    if "weak_filter" in vals:
        eq = "; at equal steps: " + diff_text(diff_interval(vals["sgtm"]["retain"][CAL],
                                                            vals["weak_filter"]["retain"][CAL]))
    claims.append(claim("at equal retain tokens: SGTM's retain loss minus the weak filter's (a loss difference, not "
                        "a compute penalty)", "-", f"{vs_text(a[CAL], b[CAL])}{eq}; {tokens}", None, diff=iv))
    return info


register(Analysis(
    name="tradeoff", help="forget vs retain loss per method at every eval step", run=on_sweeps(tradeoff),
    arguments=sweep_arguments, summaries=("tradeoff",),
    expected={"bilingual": ("tradeoff",), "wiki": ("tradeoff",)},
    cli_order=10, report_order=10, pending_order=10))
