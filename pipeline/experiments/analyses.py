"""`sgtm analyze tradeoff | undiscovered | capacity | leakage | compute-penalty | per-token |
classifier | moe | ...`: each reads sweep results (or a run) and writes ``<name>.analysis.json`` + ``<name>.png``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

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
    size_label,
    sweep_status,
    value,
    write_analysis,
)
from pipeline.experiments.stats import (
    CONFIDENCE,
    POWER_LAW_R2_FLOOR,
    all_of,
    compute_penalty,
    diff_interval,
    dose_equivalent,
    fit_power_law,
    t_interval,
    verdict,
)

COLORS = {"sgtm": "tab:red", "weak_filter": "tab:blue", "strict_filter": "tab:cyan", "no_filter": "tab:gray",
          "gradient_routing": "tab:green", "activation_masking": "tab:purple", "rmu": "tab:orange",
          "perfect_filter": "tab:brown"}
SETS = ("forget", "retain", "adjacent")
# Attacks compare steps to the target only between models whose start above it is within this ratio.
COMPARABLE_START = 0.5
CAL, RAW = "deployed_calibrated", "deployed"
INTERVAL_NOTE = ("Every number is the mean over seeds with its 95% t-interval in brackets (`mean [lo, hi]`); a "
                 "verdict is `holds` when the 95% interval of the difference (paired by seed when both sides ran "
                 "the same seeds, else Welch) lies wholly on the claimed side of 0, `does not hold` when it lies "
                 "wholly on the other side, `inconclusive` otherwise (one seed gives no interval: inconclusive). "
                 "`compare` rows state a measurement, not a claim.")
DEPLOYED_NOTE = ("Losses come from each cell's final checkpoint on the whole held-out split (`deployed.json`). "
                 "Deployed model: ablated for SGTM / Gradient Routing / activation masking, the full model for "
                 "filters and no filter. `_cal` columns add the logit-calibration bias fitted on that deployed "
                 "model, by the same procedure for every method; columns without `_cal` use no bias. Verdicts "
                 "use the calibrated loss; the verdict without bias is given next to it.")


def claim(text: str, paper: str, here: str, holds: str | None, **extra) -> dict:
    return {"claim": text, "paper": paper, "here": here, "holds": holds, **extra}


def compare(a: dict, b: dict) -> tuple[dict, str]:
    """Interval and verdict of "mean(a) > mean(b)" from per-seed values."""
    iv = diff_interval(a, b)
    return iv, verdict(iv)


def _groups(cells: list[dict], key) -> dict:
    g = defaultdict(list)
    for c in cells:
        g[key(c)].append(c)
    return dict(g)


def _interval_columns(row: dict, cells: list[dict], sets=SETS, kinds=(CAL, RAW)) -> dict:
    """``<set>_cal`` / ``<set>`` mean, 95% half-width ``_pm`` (None for one seed), per kind."""
    for s in sets:
        for kind in kinds:
            iv = t_interval(list(per_seed(cells, lambda c, s=s, k=kind: value(c, s, k)).values()))
            if iv["mean"] is None:
                continue
            col = f"{s}_cal" if kind == CAL else s if kind == RAW else f"{s}_{kind}"
            row[col] = iv["mean"]
            row[f"{col}_pm"] = None if iv["lo"] is None else iv["hi"] - iv["mean"]
    return row


def _seed_note(groups: dict) -> str:
    counts = sorted({len({c.get("seed", c.get("model_seed")) for c in cs}) for cs in groups.values()})
    return "/".join(str(n) for n in counts)


def _errorbar(ax, x, cells_fn, **kw):
    iv = t_interval(list(cells_fn.values()))
    if iv["mean"] is None:
        return iv
    err = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
    ax.errorbar([x], [iv["mean"]], yerr=err, fmt="o", capsize=3, **kw)
    return iv


# ------------------------------------------------------------------------------------ tradeoff


def tradeoff(sweeps: list[str], out: str, command: str) -> dict:
    cells = finished(sweeps)
    if not cells:
        raise ValueError("tradeoff: no finished cells in " + ", ".join(map(str, sweeps)))
    groups = _groups(cells, method_of)
    fig, (ax1, ax2) = figure(2)
    rows, curves = [], {}
    vals = {}  # method -> set -> kind -> {seed: loss}
    for m, cs in sorted(groups.items()):
        vals[m] = {s: {k: per_seed(cs, lambda c, s=s, k=k: value(c, s, k)) for k in (CAL, RAW)} for s in SETS}
        rows.append(_interval_columns({"method": m, "seeds": len(cs), "deployed_model":
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
               "seeds": _seed_note(groups), "setup": setup, "table": rows, "curves": curves, "claims": claims,
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
    sg_vals, wf_vals = _on_common_seeds(vals["sgtm"], vals[MATCHED])
    a, b = sg_vals["forget"], wf_vals["forget"]
    iv, v = compare(a[CAL], b[CAL])
    claims.append(claim("at equal retain tokens: SGTM's deployed forget loss is above the weak filter's",
                        "SGTM > weak filter at every retain loss (TinyStories 20% undiscovered)",
                        f"{_vs_text(a[CAL], b[CAL])}; {tokens}", v, diff=iv,
                        holds_uncalibrated=compare(a[RAW], b[RAW])[1]))
    a, b = sg_vals["retain"], wf_vals["retain"]
    iv, _ = compare(a[CAL], b[CAL])
    eq = ""
    if "weak_filter" in vals:
        eq = "; at equal steps: " + diff_text(diff_interval(vals["sgtm"]["retain"][CAL],
                                                            vals["weak_filter"]["retain"][CAL]))
    claims.append(claim("at equal retain tokens: SGTM's retain loss minus the weak filter's (a loss difference, not "
                        "a compute penalty)", "-", f"{_vs_text(a[CAL], b[CAL])}{eq}; {tokens}", None, diff=iv))
    return info


# --------------------------------------------------------------------------------- undiscovered


def undiscovered(sweeps: list[str], out: str, command: str) -> dict:
    cells = finished(sweeps)
    groups = _groups(cells, lambda c: (method_of(c), c["undiscovered_rate"]))
    vals = {k: {s: per_seed(cs, lambda c, s=s: value(c, s, CAL)) for s in ("forget", "retain")}
            for k, cs in groups.items()}
    raw = {k: {s: per_seed(cs, lambda c, s=s: value(c, s, RAW)) for s in ("forget", "retain")}
           for k, cs in groups.items()}
    rows = [_interval_columns({"method": m, "undiscovered_rate": r, "seeds": len(cs)}, cs, sets=("forget", "retain"))
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
               "inputs": [str(s) for s in sweeps], "seeds": _seed_note(groups), "table": rows, "claims": claims,
               "notes": [coverage_note(sweeps), DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "undiscovered", payload, fig)
    return payload


# ---------------------------------------------------------------------------------------- seeds


def seeds(sweeps: list[str], out: str, command: str) -> dict:
    """Per method, the seed-to-seed spread of the deployed forget / retain loss: how far one run
    can be from the mean (why every verdict uses an interval over seeds, not one run)."""
    cells = finished(sweeps)
    groups = _groups(cells, method_of)
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
               "seeds": _seed_note(groups), "table": rows, "claims": [],
               "notes": [coverage_note(sweeps),
                         "sd: standard deviation over seeds; pm: half-width of the 95% t-interval of the mean; "
                         "spread: max - min over seeds."]}
    write_analysis(out, "seeds", payload, fig)
    return payload


# ------------------------------------------------------------------------------------- capacity


def capacity(sweeps: list[str], out: str, command: str) -> dict:
    cells = [c for c in finished(sweeps) if "capacity" in c["labels"]]
    groups = _groups(cells, lambda c: c["labels"]["capacity"])
    rows = [_interval_columns({"capacity": k, "seeds": len(cs)}, cs, sets=("forget", "retain"))
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
               "inputs": [str(s) for s in sweeps], "seeds": _seed_note(groups), "table": rows, "claims": [],
               "notes": [coverage_note(sweeps), DEPLOYED_NOTE]}
    write_analysis(out, "capacity", payload, fig)
    return payload


# ------------------------------------------------------------------ joint policy, retain fraction

POLICY_TEXT = {"non_forget": "neither embeddings nor norms learn from forget tokens",
               "embeddings_all": "embeddings learn from forget tokens, norms do not",
               "norms_all": "norms learn from forget tokens, embeddings do not",
               "all": "embeddings and norms learn from forget tokens"}


def _axis_plot(axes, xs: list, groups: dict, label: str, categorical: bool) -> None:
    """Deployed forget / retain loss (calibrated) per axis value with 95% error bars and the
    per-seed values as dots."""
    for ax, s in zip(axes, ("forget", "retain")):
        pts = []
        for i, x in enumerate(xs):
            vals = per_seed(groups[x], lambda c, s=s: value(c, s, CAL))
            pos = i if categorical else x
            iv = _errorbar(ax, pos, vals, color="tab:red")
            ax.plot([pos] * len(vals), list(vals.values()), ".", color="k", alpha=0.4)
            pts.append((pos, iv["mean"]))
        if not categorical:
            ax.plot([p for p, _ in pts], [m for _, m in pts], "-", color="tab:red", alpha=0.5)
        if categorical:
            ax.set_xticks(range(len(xs)), [f"{x}\n({len(groups[x])} seeds)" for x in xs], fontsize=8)
        else:
            for x in xs:
                ax.annotate(f"{len(groups[x])}", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=7, color="gray")
        ax.set(title=f"SGTM deployed {s} loss (calibrated; 95% intervals, dots: seeds)",
               xlabel=label + ("" if categorical else " (gray: seeds)"),
               ylabel="nats/token" + (" (higher = more removed)" if s == "forget" else ""))
        ax.grid(alpha=0.3)


def _per_seed_losses(groups: dict, keys: list) -> dict:
    """key -> set (forget/retain) -> calibrated/raw -> {seed: deployed loss}: what seed-paired claims compare."""
    return {x: {s: {k: per_seed(groups[x], lambda c, s=s, k=k: value(c, s, k)) for k in (CAL, RAW)}
                for s in ("forget", "retain")} for x in keys}


def _on_common_seeds(x: dict, y: dict) -> tuple[dict, dict]:
    """Two groups' ``{set: {kind: {seed: loss}}}`` cut to the seeds both ran (when they share
    any): a 3-seed mean against a 1-seed value would put seed-to-seed noise into the difference;
    on common seeds the difference is paired."""
    seeds = set(x["forget"][CAL]) & set(y["forget"][CAL])
    if not seeds:
        return x, y

    def cut(g: dict) -> dict:
        return {s: {k: {sd: v for sd, v in d.items() if sd in seeds} for k, d in kinds.items()}
                for s, kinds in g.items()}

    return cut(x), cut(y)


def _vs_text(a: dict, b: dict) -> str:
    return (f"{ci_text(t_interval(list(a.values())))} vs {ci_text(t_interval(list(b.values())))}; "
            f"{diff_text(diff_interval(a, b))}")


def joint_policy(sweeps: list[str], out: str, command: str) -> dict:
    """SGTM's deployed forget / retain loss per joint-parameter policy (the ``joint_policy`` label
    of configs/sweeps/joint_policy.yaml), each policy against ``non_forget`` (paired by seed)."""
    cells = [c for c in finished(sweeps) if "joint_policy" in c["labels"] and c["strategy"] == "sgtm"]
    if not cells:
        raise ValueError("joint-policy: no finished SGTM cell with a 'joint_policy' label in " + ", ".join(sweeps))
    groups = _groups(cells, lambda c: c["labels"]["joint_policy"])
    order = [p for p in POLICY_TEXT if p in groups] + sorted(p for p in groups if p not in POLICY_TEXT)
    rows = [_interval_columns({"joint_policy": p, "seeds": len(groups[p]),
                               "what": POLICY_TEXT.get(p, p)}, groups[p], sets=("forget", "retain"))
            for p in order]
    fig, axes = figure(2)
    _axis_plot(axes, order, groups, "joint-parameter policy", categorical=True)
    vals = _per_seed_losses(groups, order)
    claims = []
    if "non_forget" in vals:
        ref = vals["non_forget"]
        for p in order:
            if p == "non_forget":
                continue
            r, q = _on_common_seeds(ref, vals[p])
            iv, v = compare(r["forget"][CAL], q["forget"][CAL])
            claims.append(claim(f"masking joint parameters for forget tokens removes more: SGTM's deployed forget "
                                f"loss with non_forget is above the one with {p} ({POLICY_TEXT.get(p, p)})",
                                "a config choice in the paper (embeddings learn jointly on TinyStories, masked on "
                                "Wikipedia); no comparison reported",
                                "non_forget vs " + p + ": " + _vs_text(r["forget"][CAL], q["forget"][CAL]),
                                v, diff=iv, holds_uncalibrated=compare(r["forget"][RAW], q["forget"][RAW])[1]))
            ivr, _ = compare(r["retain"][CAL], q["retain"][CAL])
            claims.append(claim(f"retain loss with non_forget minus with {p} (what masking costs English)",
                                "-", "non_forget vs " + p + ": " + _vs_text(r["retain"][CAL], q["retain"][CAL]),
                                None, diff=ivr))
    payload = {"title": "Joint-parameter policy (SGTM)", "command": command, "inputs": [str(s) for s in sweeps],
               "seeds": _seed_note(groups), "table": rows, "claims": claims,
               "setup": {"undiscovered_rate": cells[0]["undiscovered_rate"], "steps": cells[0]["steps"],
                         "retain_fraction": cells[0].get("retain_fraction"), "confidence": CONFIDENCE},
               "notes": [coverage_note(sweeps),
                         "Policies: non_forget = sgtm.joint_update=non_forget (embeddings follow it); embeddings_all "
                         "= sgtm.embedding_update=all; all = sgtm.joint_update=all (embeddings follow it). Norms "
                         "include the final norm; the LM head is tied to the token embedding. Claims compare a "
                         "policy with non_forget on the seeds both ran (paired).",
                         DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "joint_policy", payload, fig)
    return payload


def retain_fraction(sweeps: list[str], out: str, command: str) -> dict:
    """SGTM's deployed forget / retain loss against the share of confident-retain documents put in
    RETAIN mode (``data.tagging.retain_fraction``): retain-mode tokens never reach the forget
    parameters, so more of them should leave less English in what ablation removes."""
    cells = [c for c in finished(sweeps) if c["strategy"] == "sgtm" and c.get("retain_fraction") is not None]
    if not cells:
        raise ValueError("retain-fraction: no finished SGTM cell with a retain_fraction in " + ", ".join(sweeps))
    groups = _groups(cells, lambda c: float(c["retain_fraction"]))
    xs = sorted(groups)
    rows = [_interval_columns({"retain_fraction": x, "seeds": len(groups[x])}, groups[x], sets=("forget", "retain"))
            for x in xs]
    fig, axes = figure(2)
    _axis_plot(axes, xs, groups, "share of confident-English documents in retain mode", categorical=False)
    vals = _per_seed_losses(groups, xs)
    claims = []
    if len(xs) >= 2:
        lo, hi = xs[0], xs[-1]
        vals[lo], vals[hi] = _on_common_seeds(vals[lo], vals[hi])
        iv, v = compare(vals[lo]["retain"][CAL], vals[hi]["retain"][CAL])
        claims.append(claim(f"more retain-mode data lowers SGTM's deployed retain loss (ablation removes less "
                            f"English): retain loss at retain_fraction {lo:g} above the one at {hi:g}",
                            "retain mode on 10-25% of retain data (no sweep reported)",
                            f"{lo:g} vs {hi:g}: " + _vs_text(vals[lo]["retain"][CAL], vals[hi]["retain"][CAL]), v,
                            diff=iv, holds_uncalibrated=compare(vals[lo]["retain"][RAW], vals[hi]["retain"][RAW])[1]))
        ivf, _ = compare(vals[hi]["forget"][CAL], vals[lo]["forget"][CAL])
        claims.append(claim(f"forget loss at retain_fraction {hi:g} minus at {lo:g}", "-",
                            f"{hi:g} vs {lo:g}: " + _vs_text(vals[hi]["forget"][CAL], vals[lo]["forget"][CAL]),
                            None, diff=ivf))
    payload = {"title": "Retain-mode fraction (SGTM)", "command": command, "inputs": [str(s) for s in sweeps],
               "seeds": _seed_note(groups), "table": rows, "claims": claims,
               "setup": {"undiscovered_rate": cells[0]["undiscovered_rate"], "steps": cells[0]["steps"],
                         "confidence": CONFIDENCE},
               "notes": [coverage_note(sweeps),
                         "retain_fraction: the probability that a confidently-English document is put in RETAIN mode "
                         "(forward and backward without the forget parameters); the others stay UNLABELLED and "
                         "update every parameter. Claims compare the two ends on the seeds both ran (paired).",
                         DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "retain_fraction", payload, fig)
    return payload


# ------------------------------------------------------------------------- forget experts (MoE)

MOE_ARMS = ("dense_sgtm", "expert_sgtm", "expert_sgtm_own_first")  # SGTM arms of configs/sweeps/moe.yaml
MOE_FILTER = "weak_filter"
MOE_COLORS = {"dense_sgtm": "tab:red", "expert_sgtm": "tab:purple", "expert_sgtm_own_first": "tab:pink",
              "weak_filter": "tab:blue"}
GAP = "ablation_gap"  # pseudo-kind: deployed (ablated, no bias) minus full, per seed


def _param_counts(cell: dict) -> dict:
    """Total and per-token (active) parameters of a cell's model and its forget MLP parameters (the
    forget units' rows/columns plus whole forget experts, in every forget block), from the resolved
    ``config.yaml`` in its run dir; without it, the sweep's total only."""
    import yaml

    from pipeline.config import ModelConfig, SGTMConfig, assign_domains, from_dict
    from pipeline.model.moe import active_params, expert_params

    if cell.get("param_counts"):  # a stored cell (pipeline/experiments/cells.py) carries them
        return cell["param_counts"]
    f = Path(cell.get("run_dir") or ".") / "config.yaml"
    if not cell.get("run_dir") or not f.is_file():
        return {"params_total": cell.get("n_params"), "params_active": None, "forget_mlp_params": None}
    raw = yaml.safe_load(f.read_text())
    m = from_dict(ModelConfig, raw["model"], f"{f}: model")
    s = from_dict(SGTMConfig, raw["sgtm"], f"{f}: sgtm")
    per_unit = (3 if m.mlp == "swiglu" else 2) * m.d_model + (2 if m.mlp == "swiglu" else 1) * bool(m.bias)
    forget = sum(len(d.layers) * (len(d.units) * per_unit + len(d.experts) * expert_params(m))
                 for d in assign_domains(m, s)) if s.strategy != "none" else 0
    return {"params_total": m.num_params(), "params_active": active_params(m), "forget_mlp_params": forget}


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
    groups = _groups(cells, method_of)
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
               **_param_counts(cs[0])}
        _interval_columns(row, cs, sets=("forget", "retain"))
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
        _errorbar(ax2, i, vals[m]["forget"][CAL], color=MOE_COLORS.get(m))
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
        x, y = _on_common_seeds(vals[a], vals[b])
        return x[s][kind], y[s][kind]

    def measured(a: str, b: str, s: str, kind: str = CAL) -> str:
        x, y = pair(a, b, s, kind)
        return f"{a} vs {b}: {_vs_text(x, y)}"

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
               "inputs": [str(s) for s in sweeps], "seeds": _seed_note(groups), "table": rows, "claims": claims,
               "setup": {"undiscovered_rate": c0["undiscovered_rate"], "steps": c0["steps"],
                         "tokens": c0["tokens"], "seeds": {m: sorted(c["seed"] for c in groups[m]) for m in order},
                         "pending": pending, "confidence": CONFIDENCE},
               "notes": notes}
    write_analysis(out, "moe", payload, fig)
    return payload


# -------------------------------------------------------------------------------------- leakage


def count_tokens(run: str | Path | dict) -> dict:
    """Replay a run's training batches (the loader is a pure function of config and seed) and count
    target tokens by true label x mode; cached in ``<run>/tokens.json``. ``run``: a run dir or an
    analysis cell (a stored cell carries its counts: no run dir needed)."""
    import yaml

    from pipeline.codes import Mode
    from pipeline.config import load_config
    from pipeline.data.loader import build_loader

    if isinstance(run, dict):
        if run.get("token_counts") is not None:
            return run["token_counts"]
        if not run.get("run_dir"):
            raise FileNotFoundError(f"cell {run.get('labels')}: no token counts stored and no run dir")
        run = run["run_dir"]
    run_dir = Path(run)
    cache = run_dir / "tokens.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = load_config(data=yaml.safe_load((run_dir / "config.yaml").read_text()))
    loader = build_loader(cfg.data, seed=cfg.train.seed, micro_batch_size=cfg.engine.micro_batch_size,
                          seq_len=cfg.model.max_seq_len)
    counts = {"forget_unlabelled": 0, "forget_labelled": 0, "forget_total": 0, "total": 0}
    try:
        for _ in range(cfg.train.steps * cfg.engine.grad_accum_steps):
            b = next(loader)
            valid = b["labels"] != -100
            forget = (b["true_labels"] == 1) & valid  # true forget, first domain
            counts["total"] += int(valid.sum())
            counts["forget_total"] += int(forget.sum())
            counts["forget_unlabelled"] += int((forget & (b["modes"] == Mode.UNLABELLED)).sum())
            counts["forget_labelled"] += int((forget & (b["modes"] >= Mode.FORGET)).sum())
    finally:
        loader.close()
    cache.write_text(json.dumps(counts, indent=2))
    return counts


def leakage(sweeps: list[str], out: str, command: str) -> dict:
    """Per model size: dose-response of plain runs (weak filter at undiscovered rate r = retain data
    plus the N forget tokens that slipped through) -> forget loss(N), pooled over seeds; each SGTM
    run's post-ablation forget loss (no bias) -> N_equivalent; leakage = N_equivalent / undiscovered
    tokens it saw; mean and 95% interval over seeds per (size, rate). Sizes are compared at one
    matched undiscovered rate only (leakage depends on the rate)."""
    cells = finished(sweeps)
    by_size = _groups(cells, lambda c: (c["d_model"], c["n_layers"], c["n_params"]))
    runs, curves = [], {}
    fig, (ax1, ax2) = figure(2)
    from pipeline.experiments.stats import nonincreasing

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
    for (size, rate), rs in sorted(_groups(runs, lambda r: (r["size"], r["undiscovered_rate"])).items(),
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
               "runs": runs, "curves": curves, "claims": claims, "seeds": _seed_note(
                   _groups(runs, lambda r: (r["size"], r["undiscovered_rate"]))) if runs else "0",
               "notes": [coverage_note(sweeps),
                         "N counts the forget tokens a plain run trained on (weak filter at a small undiscovered "
                         "rate), replayed from the loader; the dose-response pools the dose runs of every seed. "
                         "bound=below: SGTM forgot more than the N=0 run (leakage 0); bound=above: less than the "
                         "largest dose (leakage is then a lower bound). Losses without bias, whole held-out split.",
                         INTERVAL_NOTE]}
    write_analysis(out, "leakage", payload, fig)
    return payload


# ------------------------------------------------------------------------------- compute penalty


def _penalty(fit: dict, loss_: float | None, flops: float | None) -> tuple[float | None, str | None]:
    """A run's compute penalty under ``fit``, or None and the reason: a flat fit turns no loss into
    a compute, so it gives no number rather than a sign-of-rounding 0% / 100% or an overflow."""
    if fit["flat"]:
        return None, f"no penalty: the fit is flat ({fit['reason']})"
    if loss_ is None or flops is None:
        return None, "no loss recorded"
    p = compute_penalty(fit["a"], fit["b"], loss_, flops)
    if p is None or not math.isfinite(p):
        return None, "no penalty: C_equivalent is beyond the float range"
    return p, None


def compute_penalty_analysis(sweeps: list[str], out: str, command: str, from_history: bool = False) -> dict:
    """Fit loss = a * C^-b on the no-filter runs of several sizes (C = 6 * params * tokens), per set,
    and express every other run's deployed loss as the compute fraction it gave up; mean and 95%
    interval over seeds per (set, method).

    ``from_history`` also uses every intermediate evaluation of the no-filter runs as a (C, loss)
    point (C from the tokens seen by then): a one-size stand-in when several sizes are not
    available; the points before the end of the cosine schedule are not converged. The fit then
    sees the training-time evaluations (first eval batches, no bias), so every run is scored on the
    same batches: its last training-time evaluation of the model it deploys, not the whole-split
    deployed loss. Written as ``compute_penalty_history`` (beside the whole-split analysis)."""
    cells = finished(sweeps)
    plain = [c for c in cells if c["strategy"] == "none" and c["filter"] == "none"]
    compute = {c["key"]: 6.0 * c["n_params"] * c["tokens"] for c in cells}
    fits, runs = {}, []
    fig, axes = figure(3, width=5)
    for ax, s in zip(axes, SETS):
        if from_history:
            pts = [(6.0 * c["n_params"] * c["tokens_per_step"] * r["step"], loss(r, s, "full"))
                   for c in plain for r in c["history"]]
        else:
            pts = [(compute[c["key"]], value(c, s, "full")) for c in plain]
        pts = [p for p in pts if p[1] is not None]
        if len({p[0] for p in pts}) < 2:
            ax.set_visible(False)
            continue
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        fits[s] = {**fit, "compute_span": max(p[0] for p in pts) / min(p[0] for p in pts)}
        cs = np.geomspace(min(p[0] for p in pts) / 2, max(p[0] for p in pts) * 2, 50)
        ax.plot(cs, fit["a"] * cs ** -fit["b"], "k--", lw=1,
                label=f"fit a*C^-b, b={fit['b']:.3f}" + (" (flat: no penalty)" if fit["flat"] else ""))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "ko", label="no filter")
        for c in cells:
            if c in plain:
                continue
            if from_history:  # the fit's batches and no bias: the last training-time evaluation
                last = c["history"][-1] if c["history"] else None
                v = raw = deployed(c, s, last) if last else None
                flops = 6.0 * c["n_params"] * c["tokens_per_step"] * last["step"] if last else None
            else:
                v, raw, flops = value(c, s, CAL), value(c, s, RAW), compute[c["key"]]
            if v is None:
                continue
            m = method_of(c)
            pen, why = _penalty(fit, v, flops)
            runs.append({"set": s, "method": m, "size": size_label(c), "undiscovered_rate": c["undiscovered_rate"],
                         "seed": c["seed"], "compute_flops": flops, "loss": v, "penalty": pen,
                         "loss_no_bias": raw, "penalty_no_bias": _penalty(fit, raw, flops)[0],
                         **({"no_penalty": why} if why else {})})
            ax.plot([flops], [v], "o", color=COLORS.get(m, "tab:olive"), ms=4)
        ax.set(xscale="log", yscale="log", title=f"{s} loss vs compute", xlabel="C = 6 N D (FLOPs)",
               ylabel="loss (deployed model, calibrated)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    table = []
    for (s, m, size), rs in sorted(_groups(runs, lambda r: (r["set"], r["method"], r["size"])).items()):
        iv, ivr = t_interval([r["penalty"] for r in rs]), t_interval([r["penalty_no_bias"] for r in rs])
        why = sorted({r["no_penalty"] for r in rs if "no_penalty" in r})
        table.append({"set": s, "method": m, "size": size, "seeds": len(rs), "penalty": iv["mean"],
                      "penalty_pm": None if iv["lo"] is None else iv["hi"] - iv["mean"],
                      "penalty_no_bias": ivr["mean"], **({"no_penalty": "; ".join(why)} if why else {})})
    paper = {("retain", "sgtm"): "5%", ("retain", "weak_filter"): "-10%", ("retain", "strict_filter"): "-15%",
             ("forget", "sgtm"): "99%", ("forget", "weak_filter"): "95%", ("forget", "strict_filter"): "96%"}
    claims = []
    for (s, m), rs in sorted(_groups(runs, lambda r: (r["set"], r["method"])).items()):
        if (s, m) not in paper:
            continue
        iv = t_interval([100 * r["penalty"] for r in rs if r["penalty"] is not None])
        if fits[s]["flat"]:
            here = f"no penalty: the fit is flat ({fits[s]['reason']})"
        else:
            why = "; ".join(sorted({r["no_penalty"] for r in rs if "no_penalty" in r}))
            here = f"{ci_text(iv, 0)} % over {iv['n']} runs" + (
                f" ({len(rs) - iv['n']} without a penalty: {why})" if why else "")
        claims.append(claim(f"compute penalty (from the fitted scaling law) on {s} for {m}",
                            paper[(s, m)] + " (Wikipedia 254M; retain = general knowledge)", here, None))
    span = {k: v["compute_span"] for k, v in fits.items()}
    title = "Compute penalty from the training histories" if from_history else "Compute penalty"
    payload = {"title": title, "command": command, "inputs": [str(s) for s in sweeps],
               "fits": fits, "table": table, "runs": runs, "claims": claims, "seeds": _seed_note(
                   _groups(runs, lambda r: (r["set"], r["method"], r["size"]))) if runs else "0",
               "notes": [coverage_note(sweeps),
                         "penalty = 1 - C_equivalent / C: C_equivalent is the compute at which the no-filter fit "
                         "reaches the run's deployed (calibrated) loss; penalty_no_bias uses the loss without bias. "
                         "Positive: the method costs compute on that set; on the forget set a large penalty is the "
                         "goal. A loss increase and a compute penalty are different quantities: with a shallow fit "
                         "(small b) a small loss gap is a large compute fraction.",
                         f"Each fit gives b with its {100 * CONFIDENCE:g}% t-interval (slope standard error, n - 2 "
                         "degrees of freedom) and R^2. A fit is flat when that interval contains 0, when it has only "
                         f"2 points (no interval) or when R^2 < {POWER_LAW_R2_FLOOR:g}: its set gets \"no penalty: "
                         "the fit is flat\" instead of a number (a flat b is noise whose sign decides whether "
                         "C_equivalent is 0 or unbounded).",
                         *[f"{k}: no penalty: the fit is flat ({v['reason']})." for k, v in fits.items() if v["flat"]],
                         f"Fit on no-filter runs spanning {max(span.values()):.1f}x in compute at a fixed step count "
                         "(not compute-optimal)." if span and not from_history else
                         "Fit on every training-time evaluation of the no-filter run(s) (--from-history): compute "
                         "varies by tokens seen, not by model size; the points before the end of the cosine schedule "
                         "are not what a run of that length would reach. Every run is scored on the same batches "
                         "(the first eval batches, no bias): its last training-time evaluation of the deployed "
                         "model, so penalty and penalty_no_bias coincide." if from_history else ""]}
    write_analysis(out, "compute_penalty_history" if from_history else "compute_penalty", payload, fig)
    return payload


# ------------------------------------------------------------------------------------ per-token


def per_token(run: str, out: str, command: str, step: int | None = None) -> dict:
    run_dir = Path(run)
    files = sorted((run_dir / "eval").glob("step*_forget*_per_token.npz"))
    if step is not None:
        files = [f for f in files if f.name.startswith(f"step{step:08d}")]
    if not files:
        raise FileNotFoundError(f"{run_dir}/eval: no per-token forget losses (train with eval enabled)")
    f = files[-1]
    data = np.load(f)
    full, abl = data["full"], data["ablated"]
    cal = data["calibrated"] if "calibrated" in data and data["calibrated"].size else None
    delta = abl - full
    qs = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    res = {"file": str(f), "tokens": int(full.size),
           "mean": {"full": float(full.mean()), "ablated": float(abl.mean()),
                    "calibrated": float(cal.mean()) if cal is not None else None},
           "quantiles": {k: [float(np.quantile(v, q)) for q in qs]
                         for k, v in (("full", full), ("ablated", abl), ("calibrated", cal)) if v is not None},
           "delta_quantiles": [float(np.quantile(delta, q)) for q in qs],
           "share_tokens_up_1nat": float((delta > 1).mean()),
           "share_tokens_down": float((delta < 0).mean()),
           "share_of_increase_from_top_10pct_tokens": float(np.sort(np.clip(delta, 0, None))[::-1][
               : max(1, delta.size // 10)].sum() / max(np.clip(delta, 0, None).sum(), 1e-9))}
    fig, (ax1, ax2) = figure(2)
    bins = np.linspace(0, max(float(abl.max()), float(full.max())), 80)
    ax1.hist(full, bins=bins, alpha=0.5, density=True, label="full model")
    ax1.hist(abl, bins=bins, alpha=0.5, density=True, label="after ablation")
    if cal is not None:
        ax1.hist(cal, bins=bins, histtype="step", density=True, label="ablated + calibrated")
    ax1.set(title="per-token forget loss", xlabel="nats", ylabel="density")
    ax2.hist(delta, bins=80, density=True, color="tab:red")
    ax2.set(title="per-token change from ablation (ablated - full)", xlabel="nats", ylabel="density")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8) if ax is ax1 else None
    rows = [{"model": k, "mean": res["mean"][k], **{f"q{int(q * 100)}": v for q, v in zip(qs, res["quantiles"][k])}}
            for k in res["quantiles"]]
    claims = [{"claim": "removal is broad (most forget tokens get harder), not a few extreme tokens",
               "paper": "per-token analysis: broad shift", "here":
               f"{100 * (1 - res['share_tokens_down']):.0f}% of tokens got harder; the top 10% of tokens carry "
               f"{100 * res['share_of_increase_from_top_10pct_tokens']:.0f}% of the increase (one run: no interval "
               "over seeds)", "holds": "inconclusive",
               "one_run_direction": bool(res["share_tokens_down"] < 0.5
                                         and res["share_of_increase_from_top_10pct_tokens"] < 0.5)}]
    payload = {"title": "Per-token forget loss before/after ablation", "command": command, "inputs": [str(run)],
               "results": res, "table": rows, "claims": claims,
               "notes": ["One run (the SGTM cell of seed 0), on the held-out batches of its training-time evaluation "
                         "(the first eval.batches), without calibration."]}
    write_analysis(out, "per_token", payload, fig)
    return payload


# ----------------------------------------------------------------------------------- classifier


def classifier(sweeps: list[str], out: str, command: str) -> dict:
    """Precision/recall of the tags that reached training (classifier or simulated), per sweep base."""
    import yaml

    from pipeline.config import load_config
    from pipeline.data.loader import tagging_report

    rows, seen = [], set()
    for s in sweeps:
        data = json.loads((Path(s) / "results.json" if Path(s).is_dir() else Path(s)).read_text())
        base = Path(data["base"])
        cfg = load_config(data=yaml.safe_load(base.read_text()))
        key = json.dumps(cfg.data.to_dict(), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        conf = tagging_report(cfg.data).to_dict()
        dom = f"forget:{cfg.data.domains[0]}"
        tp = conf.get(dom, {}).get(dom, {}).get("tokens", 0)
        true_f = sum(v["tokens"] for v in conf.get(dom, {}).values())
        tagged_f = sum(row.get(dom, {}).get("tokens", 0) for row in conf.values())
        rows.append({"sweep": data["sweep"], "tagging": cfg.data.tagging.source,
                     "recall_tokens": tp / true_f if true_f else None,
                     "precision_tokens": tp / tagged_f if tagged_f else None,
                     "undiscovered_tokens_share": 1 - tp / true_f if true_f else None,
                     "forget_share_of_train_tokens": true_f / max(1, sum(v["tokens"] for r in conf.values()
                                                                        for v in r.values())),
                     "confusion": conf})
    payload = {"title": "Tagging quality (train split)", "command": command, "inputs": [str(s) for s in sweeps],
               "table": [{k: v for k, v in r.items() if k != "confusion"} for r in rows], "details": rows,
               "claims": []}
    write_analysis(out, "classifier", payload, None)
    return payload


# -------------------------------------------------------------------------------------- attacks


def _censored_steps(r: dict, level: float) -> tuple[float, bool]:
    """Steps an attack took to bring the forget loss to ``level`` and whether that is censored
    (not reached in the steps run: the value is then a lower bound, the steps run + 1)."""
    from pipeline.experiments.stats import steps_to_threshold

    h = r["history"]
    hit = steps_to_threshold([x["step"] for x in h], [x["forget_loss"] for x in h], level)
    if hit["step"] is None:
        return float(h[-1]["step"] + 1), True
    return float(hit["step"]), False


def attacks(runs: list[str], out: str, command: str, thresholds: list[float] | None = None) -> dict:
    """All fine-tuning attack results (``attack*.analysis.json`` under ``runs``), grouped by the
    attacked method over model seeds: how far each model starts above its target (the no-filter
    model's forget loss on the same held-out batches, per seed) and how many steps the attack
    needs to reach it."""
    found = sorted({p.resolve() for r in runs for p in Path(r).rglob("attack*.analysis.json")
                    if p.name != "attacks.analysis.json"})
    if not found:
        raise FileNotFoundError("attacks: no attack*.analysis.json under " + ", ".join(map(str, runs)))
    results = [json.loads(p.read_text())["results"] for p in found]
    groups = _groups(results, lambda r: r.get("label") or r["strategy"])
    fig, (ax,) = figure(1, width=7.5)
    rows, per = [], {}
    for m, rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("threshold") is not None]
        gap = {r.get("model_seed", 0): r["forget_loss_start"] - r["threshold"] for r in ok}
        steps = {r.get("model_seed", 0): _censored_steps(r, r["threshold"]) for r in ok}
        per[m] = {"gap": gap, "steps": {k: v for k, (v, _) in steps.items()},
                  "censored": {k for k, (_, c) in steps.items() if c}}
        for r in rs:
            h = r["history"]
            ax.plot([x["step"] for x in h], [x["forget_loss"] - (r["threshold"] or 0) for x in h], "-", lw=1,
                    color=COLORS.get(m), label=m if r is rs[0] else None)
        giv, siv = t_interval(list(gap.values())), t_interval(list(per[m]["steps"].values()))
        row = {"attacked": m, "seeds": len(rs), "start_above_target": giv["mean"],
               "start_above_target_pm": None if giv["lo"] is None else giv["hi"] - giv["mean"],
               "steps_to_target": siv["mean"],
               "steps_to_target_pm": None if siv["lo"] is None else siv["hi"] - siv["mean"],
               "not_reached": len(per[m]["censored"]), "steps_run": max(r["history"][-1]["step"] for r in rs),
               "retain_start": float(np.mean([r["retain_loss_start"] for r in rs])),
               "retain_end": float(np.mean([r["retain_loss_end"] for r in rs]))}
        for lv in thresholds or []:
            vals = [_censored_steps(r, lv) for r in rs]
            row[f"steps_to_{lv:g}"] = float(np.mean([v for v, _ in vals]))
        rows.append(row)
    ax.axhline(0, color="k", ls="--", lw=1, label="target: the no-filter model's forget loss")
    ax.set(title="fine-tuning attack: held-out forget loss minus the target, per model seed", xlabel="attack step",
           ylabel="forget loss - target (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    claims = []
    if "sgtm" in per and "rmu" in per:
        s_, r_ = per["sgtm"], per["rmu"]
        start = {m: t_interval(list(per[m]["gap"].values())) for m in ("sgtm", "rmu")}
        removed = {m: verdict(start[m]) for m in start}
        iv = diff_interval(s_["steps"], r_["steps"])
        if removed["rmu"] != "holds" or removed["sgtm"] != "holds":
            who = [m.upper() for m in ("sgtm", "rmu") if removed[m] != "holds"]
            v, why = "inconclusive", (f"; {' and '.join(who)} did not start measurably above the target (interval of "
                                      "start - target not above 0): nothing to recover, so steps measure nothing")
        elif min(g["mean"] for g in start.values()) < COMPARABLE_START * max(g["mean"] for g in start.values()):
            # A model that starts a hundredth of a nat above the target "recovers" in a few noisy steps
            # whatever the method: steps compare resistance only from comparable starting points.
            v, why = "inconclusive", (f"; the two start too far apart to compare (one is below {COMPARABLE_START:g}x "
                                      "the other's start above the target): steps to the target measure how much "
                                      "was removed, not how robustly")
        elif r_["censored"]:
            v, why = "inconclusive", "; the RMU attack did not reach the target in some seeds (censored)"
        else:
            v, why = verdict(iv), (" (SGTM's censored seeds count as steps run + 1, a lower bound)"
                                   if s_["censored"] else "")
        claims.append(claim("SGTM resists fine-tuning longer than RMU (steps to the no-filter forget loss)",
                            "RMU 50 steps; SGTM 350 (~7x)",
                            f"start above target: SGTM {ci_text(start['sgtm'])}, RMU {ci_text(start['rmu'])}; "
                            "steps: SGTM "
                            f"{ci_text(t_interval(list(s_['steps'].values())), 0)}, RMU "
                            f"{ci_text(t_interval(list(r_['steps'].values())), 0)}; {diff_text(iv, 0)}" + why,
                            v, diff=iv))
    payload = {"title": "Fine-tuning attacks compared", "command": command, "inputs": [str(p) for p in found],
               "seeds": _seed_note(groups), "table": rows, "claims": claims,
               "notes": ["target: the no-filter model of the same seed, its forget loss on the attack's own held-out "
                         "batches (the whole held-out forget split); start_above_target: the attacked model's forget "
                         "loss before the attack minus that target; steps_to_target: first evaluated attack step at "
                         "or below the target (not reached: steps run + 1, counted in not_reached).", INTERVAL_NOTE]}
    write_analysis(out, "attacks", payload, fig)
    return payload
