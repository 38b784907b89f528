"""`sgtm analyze tradeoff | undiscovered | capacity | leakage | compute-penalty | per-token |
classifier`: each reads sweep results (or a run) and writes ``<name>.analysis.json`` + ``<name>.png``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.experiments.common import (
    deployed,
    deployed_kind,
    figure,
    load_cells,
    loss,
    method_of,
    size_label,
    write_analysis,
)
from pipeline.experiments.stats import compute_penalty, dose_equivalent, fit_power_law

COLORS = {"sgtm": "tab:red", "weak_filter": "tab:blue", "strict_filter": "tab:cyan", "no_filter": "tab:gray",
          "gradient_routing": "tab:green", "activation_masking": "tab:purple", "rmu": "tab:orange"}
SETS = ("forget", "retain", "adjacent")
# Two single-seed losses closer than this are "within noise". It covers the largest seed-to-seed
# spread (max - min over seeds 0-2) of a deployed loss measured at CPU scale, 0.153 nats (SGTM's
# forget loss; `sgtm analyze seeds`, docs/results.md "Seed-to-seed spread"), and ~2 standard
# deviations of the difference of two single runs (sd <= 0.081 each). Verdicts compare against it.
NOISE_NATS = 0.2


def beats(a: float, b: float, noise: float = NOISE_NATS) -> bool | str:
    """Is ``a`` above ``b``: True / False when they differ by more than ``noise``, else "within noise"."""
    if abs(a - b) < noise:
        return "within noise"
    return a > b


def dominates(*verdicts: bool | str) -> bool | str:
    """Pareto dominance from per-axis ``beats`` verdicts: clearly better on one axis, worse on none."""
    if False in verdicts:
        return False
    return True if True in verdicts else "within noise"


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ------------------------------------------------------------------------------------ tradeoff


def tradeoff(sweeps: list[str], out: str, command: str) -> dict:
    cells = [c for c in load_cells(sweeps) if c["done"]]
    if not cells:
        raise ValueError("tradeoff: no finished cells in " + ", ".join(map(str, sweeps)))
    fig, (ax1, ax2) = figure(2)
    rows, curves = [], {}
    for c in cells:
        m = method_of(c)
        seed = c["seed"]
        label = m if seed == 0 else f"{m} (seed {seed})"
        hist = c["history"]
        pts = [(r["step"], deployed(c, "retain", r), deployed(c, "forget", r)) for r in hist]
        curves[label] = pts
        col = COLORS.get(m)
        ax1.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color=col, ms=3, label=label)
        ax1.annotate(str(pts[-1][0]), (pts[-1][1], pts[-1][2]), fontsize=6)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "-", color=col, label=f"{label} forget")
        f = c["final"]
        row = {"method": m, "seed": seed, "undiscovered_rate": c["undiscovered_rate"], "deployed": deployed_kind(c)}
        for s in SETS:
            if loss(f, s, "full") is None:
                continue
            row[f"{s}_full"] = loss(f, s, "full")
            row[f"{s}_ablated"] = loss(f, s, "ablated")
            row[f"{s}_calibrated"] = loss(f, s, "calibrated")
            row[f"{s}_deployed"] = deployed(c, s)
        row["run_dir"] = c["run_dir"]
        rows.append(row)
    ax1.set(title="forget vs retain loss of the deployed model at every eval step",
            xlabel="retain loss (lower is better)", ylabel="forget loss (higher is better)")
    ax2.set(title="deployed forget loss during training", xlabel="step", ylabel="nats/token")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    by = {r["method"]: r for r in rows if r["seed"] == 0}
    claims = []
    if "sgtm" in by and "weak_filter" in by:
        s, w = by["sgtm"], by["weak_filter"]
        claims.append({"claim": "SGTM's deployed forget loss is above the weak filter's with noisy labels",
                       "paper": "SGTM > weak filter at every retain loss (TinyStories 20% undiscovered; Wikipedia)",
                       "here": f"{s['forget_deployed']:.3f} vs {w['forget_deployed']:.3f}",
                       "holds": beats(s["forget_deployed"], w["forget_deployed"])})
    if "sgtm" in by and "strict_filter" in by:
        s, w = by["sgtm"], by["strict_filter"]
        claims.append({"claim": "SGTM's forget loss is above the strict filter's",
                       "paper": "SGTM > strict filter on Wikipedia biology",
                       "here": f"{s['forget_deployed']:.3f} vs {w['forget_deployed']:.3f}",
                       "holds": beats(s["forget_deployed"], w["forget_deployed"])})
    if "sgtm" in by and "gradient_routing" in by:
        s, g = by["sgtm"], by["gradient_routing"]
        dom = dominates(beats(s["forget_deployed"], g["forget_deployed"]),
                        beats(g["retain_deployed"], s["retain_deployed"]))
        claims.append({"claim": "SGTM Pareto-dominates Gradient Routing (higher forget, lower retain loss)",
                       "paper": "yes (TinyStories)",
                       "here": f"forget {s['forget_deployed']:.3f} vs {g['forget_deployed']:.3f}; "
                               f"retain {s['retain_deployed']:.3f} vs {g['retain_deployed']:.3f}",
                       "holds": dom})
    if "sgtm" in by and "no_filter" in by:
        s, n = by["sgtm"], by["no_filter"]
        claims.append({"claim": "SGTM's retain loss costs little against no filtering",
                       "paper": "a few percent (compute penalty 5% on Wikipedia)",
                       "here": f"retain {s['retain_deployed']:.3f} vs {n['retain_deployed']:.3f} "
                               f"({100 * (s['retain_deployed'] / n['retain_deployed'] - 1):+.1f}%); uncalibrated "
                               f"ablated {s['retain_ablated']:.3f} "
                               f"({100 * (s['retain_ablated'] / n['retain_deployed'] - 1):+.1f}%)",
                       "holds": None})
    payload = {"title": "Retain/forget trade-off", "command": command, "inputs": [str(s) for s in sweeps],
               "table": rows, "curves": curves, "claims": claims,
               "notes": ["deployed = calibrated loss after ablation for SGTM / Gradient Routing / activation "
                         "masking, the full model for filters and no filter"]}
    write_analysis(out, "tradeoff", payload, fig)
    return payload


# --------------------------------------------------------------------------------- undiscovered


def undiscovered(sweeps: list[str], out: str, command: str) -> dict:
    cells = [c for c in load_cells(sweeps) if c["done"]]
    groups = defaultdict(list)
    for c in cells:
        groups[(method_of(c), c["undiscovered_rate"])].append(c)
    rows = []
    for (m, r), cs in sorted(groups.items()):
        row = {"method": m, "undiscovered_rate": r, "seeds": sorted(c["seed"] for c in cs)}
        for s in SETS:
            row[f"{s}_deployed"] = _mean(deployed(c, s) for c in cs)
        row["forget_ablated"] = _mean(loss(c["final"], "forget", "ablated") for c in cs)
        row["forget_full"] = _mean(loss(c["final"], "forget", "full") for c in cs)
        row["retain_ablated"] = _mean(loss(c["final"], "retain", "ablated") for c in cs)
        rows.append(row)
    fig, (ax1, ax2) = figure(2)
    for m in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == m]
        x = [100 * r["undiscovered_rate"] for r in rs]
        ax1.plot(x, [r["forget_deployed"] for r in rs], "o-", color=COLORS.get(m), label=m)
        ax2.plot(x, [r["retain_deployed"] for r in rs], "o-", color=COLORS.get(m), label=m)
    ax1.set(title="forget loss of the deployed model", xlabel="undiscovered forget data (%)",
            ylabel="nats/token (higher = more removed)")
    ax2.set(title="retain loss of the deployed model", xlabel="undiscovered forget data (%)", ylabel="nats/token")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    claims = []
    sg = {r["undiscovered_rate"]: r for r in rows if r["method"] == "sgtm"}
    wf = {r["undiscovered_rate"]: r for r in rows if r["method"] == "weak_filter"}
    common = sorted(set(sg) & set(wf))
    for rate in common:
        if rate == 0:
            continue
        claims.append({"claim": f"SGTM forgets more than filtering at {100 * rate:g}% undiscovered",
                       "paper": "yes at every rate up to 40% (TinyStories 64M)",
                       "here": f"{sg[rate]['forget_deployed']:.3f} vs {wf[rate]['forget_deployed']:.3f}",
                       "holds": beats(sg[rate]["forget_deployed"], wf[rate]["forget_deployed"])})
    if 0.0 in wf and 0.2 in sg:
        perfect, s20 = wf[0.0]["forget_deployed"], sg[0.2]["forget_deployed"]
        claims.append({"claim": "SGTM at 20% undiscovered stays close to perfect filtering",
                       "paper": "close to the 0%-undiscovered filter",
                       "here": f"SGTM@20% {s20:.3f} vs perfect filter {perfect:.3f} ({s20 / perfect:.0%} of it)",
                       "holds": s20 >= 0.9 * perfect})
    small = [r for r in sorted(wf) if 0 < r <= 0.05]
    if 0.0 in wf and small and max(wf) > 0:
        drop_small = wf[0.0]["forget_deployed"] - wf[small[0]]["forget_deployed"]
        drop_all = wf[0.0]["forget_deployed"] - wf[max(wf)]["forget_deployed"]
        claims.append({"claim": f"filtering loses much of its effect as soon as a little forget data slips through "
                                f"({100 * small[0]:g}%)",
                       "paper": "forget loss drops sharply at small undiscovered rates",
                       "here": f"{100 * small[0]:g}% undiscovered already gives {drop_small / drop_all:.0%} of the "
                               f"drop seen at {100 * max(wf):g}%" if drop_all > 0 else "no drop",
                       "holds": drop_all > 0 and drop_small / drop_all >= 0.3})
    payload = {"title": "Undiscovered forget data (paper Fig. 3)", "command": command,
               "inputs": [str(s) for s in sweeps], "table": rows, "claims": claims}
    write_analysis(out, "undiscovered", payload, fig)
    return payload


# ---------------------------------------------------------------------------------------- seeds


def seeds(sweeps: list[str], out: str, command: str) -> dict:
    """Per method, the spread of the deployed forget / retain loss over seeds: the noise level
    below which one-seed differences in the other analyses mean nothing."""
    cells = [c for c in load_cells(sweeps) if c["done"]]
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        groups[method_of(c)].append(c)
    rows = []
    fig, axes = figure(2)
    for i, (m, cs) in enumerate(sorted(groups.items())):
        cs = sorted(cs, key=lambda c: c["seed"])
        row = {"method": m, "seeds": [c["seed"] for c in cs]}
        for ax, s in zip(axes, ("forget", "retain")):
            vals = [deployed(c, s) for c in cs]
            ax.plot([i] * len(vals), vals, "o", color=COLORS.get(m, "k"))
            row.update({f"{s}_mean": float(np.mean(vals)),
                        f"{s}_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                        f"{s}_spread": float(max(vals) - min(vals))})
        rows.append(row)
    for ax, s in zip(axes, ("forget", "retain")):
        ax.set_xticks(range(len(groups)), sorted(groups), fontsize=8)
        ax.set(title=f"deployed {s} loss per seed", ylabel="nats/token")
        ax.grid(alpha=0.3)
    spreads = [r[f"{s}_spread"] for r in rows for s in ("forget", "retain") if len(r["seeds"]) > 1]
    claims = [{"claim": f"one-seed differences under {NOISE_NATS} nats are called 'within noise' (NOISE_NATS)",
               "paper": "(this project's margin, not a paper claim)",
               "here": f"largest seed-to-seed spread of a deployed loss: {max(spreads):.3f} nats over "
                       f"{max(len(r['seeds']) for r in rows)} seeds" if spreads else "one seed only",
               "holds": bool(spreads) and max(spreads) <= NOISE_NATS}]
    payload = {"title": "Seed-to-seed spread", "command": command, "inputs": [str(s) for s in sweeps],
               "table": rows, "claims": claims}
    write_analysis(out, "seeds", payload, fig)
    return payload


# ------------------------------------------------------------------------------------- capacity


def capacity(sweeps: list[str], out: str, command: str) -> dict:
    cells = [c for c in load_cells(sweeps) if c["done"] and "capacity" in c["labels"]]
    rows = []
    for c in cells:
        rows.append({"capacity": c["labels"]["capacity"], "seed": c["seed"],
                     "forget_deployed": deployed(c, "forget"), "forget_ablated": loss(c["final"], "forget", "ablated"),
                     "forget_full": loss(c["final"], "forget", "full"), "retain_deployed": deployed(c, "retain"),
                     "retain_full": loss(c["final"], "retain", "full")})
    rows.sort(key=lambda r: (r["capacity"][-2:], int(r["capacity"][1:].split("_")[0])))
    fig, (ax1, ax2) = figure(2)
    for h in sorted({r["capacity"].split("_")[1] for r in rows}):
        rs = [r for r in rows if r["capacity"].endswith(h)]
        x = [int(r["capacity"][1:].split("_")[0]) for r in rs]
        ax1.plot(x, [r["forget_deployed"] for r in rs], "o-", label=f"{h[1:]} forget head(s)")
        ax2.plot(x, [r["retain_deployed"] for r in rs], "o-", label=f"{h[1:]} forget head(s)")
    ax1.set(title="forget loss after removal", xlabel="forget MLP units per block", xscale="log")
    ax2.set(title="retain loss after removal", xlabel="forget MLP units per block", xscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    payload = {"title": "Forget capacity (MLP units x heads)", "command": command,
               "inputs": [str(s) for s in sweeps], "table": rows, "claims": []}
    write_analysis(out, "capacity", payload, fig)
    return payload


# -------------------------------------------------------------------------------------- leakage


def count_tokens(run_dir: str | Path) -> dict:
    """Replay a run's training batches (the loader is a pure function of config and seed) and count
    target tokens by true label x mode; cached in ``<run>/tokens.json``."""
    import yaml

    from pipeline.config import load_config
    from pipeline.data.loader import build_loader
    from pipeline.sgtm.codes import Mode

    run_dir = Path(run_dir)
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
    plus the N forget tokens that slipped through) -> forget loss(N); each SGTM run's uncalibrated
    post-ablation forget loss -> N_equivalent; leakage = N_equivalent / undiscovered tokens it saw."""
    cells = [c for c in load_cells(sweeps) if c["done"]]
    by_size = defaultdict(list)
    for c in cells:
        by_size[(c["d_model"], c["n_layers"], c["n_params"])].append(c)
    rows, curves = [], {}
    fig, (ax1, ax2) = figure(2)
    for (d, L, n), cs in sorted(by_size.items()):
        doses = [c for c in cs if c["strategy"] == "none" and c["filter"] == "weak"]
        sgtm = [c for c in cs if c["strategy"] == "sgtm" and c["undiscovered_rate"] > 0]
        if len(doses) < 2 or not sgtm:
            continue
        pts = sorted((count_tokens(c["run_dir"])["forget_unlabelled"], loss(c["final"], "forget", "full"))
                     for c in doses)
        agg = defaultdict(list)
        for x, y in pts:
            agg[x].append(y)
        xs = sorted(agg)
        ys = [float(np.mean(agg[x])) for x in xs]
        size = size_label(cs[0])
        curves[size] = {"forget_tokens": xs, "forget_loss": ys}
        line = ax1.plot([max(x, 1) for x in xs], ys, "o", label=f"plain + N forget tokens, {size}")[0]
        from pipeline.experiments.stats import nonincreasing

        mono = nonincreasing(ys)
        for i in range(1, len(xs)):  # the interpolation actually used: linear in N from 0, in log N after
            grid = np.geomspace(max(xs[i - 1], 1), xs[i], 30)
            if xs[i - 1] <= 0:
                yy = mono[i - 1] + (mono[i] - mono[i - 1]) * grid / xs[i]
            else:
                yy = mono[i - 1] + (mono[i] - mono[i - 1]) * np.log(grid / xs[i - 1]) / np.log(xs[i] / xs[i - 1])
            ax1.plot(grid, yy, "-", color=line.get_color())
        for c in sgtm:
            tok = count_tokens(c["run_dir"])
            target = loss(c["final"], "forget", "ablated")
            eq = dose_equivalent(xs, ys, target)
            leak = eq["n"] / tok["forget_unlabelled"] if tok["forget_unlabelled"] else None
            rows.append({"size": size, "d_model": d, "n_layers": L, "n_params": n,
                         "undiscovered_rate": c["undiscovered_rate"], "seed": c["seed"],
                         "sgtm_forget_ablated": target, "undiscovered_tokens_seen": tok["forget_unlabelled"],
                         "n_equivalent": eq["n"], "bound": eq["bound"], "leakage": leak,
                         "run_dir": c["run_dir"]})
            ax1.plot([max(eq["n"], 1)], [target], "*", ms=11, color=line.get_color())
            ax1.annotate(f"SGTM {100 * c['undiscovered_rate']:g}%", (max(eq["n"], 1), target), fontsize=7)
    for size in sorted({r["size"] for r in rows}):
        rs = sorted((r for r in rows if r["size"] == size), key=lambda r: r["undiscovered_rate"])
        ax2.plot([100 * r["undiscovered_rate"] for r in rs], [max(r["leakage"] or 0, 1e-5) for r in rs], "o-",
                 label=size)
    ax1.set(xscale="log", title="dose-response (N = 0 drawn at 1) and SGTM runs (stars)",
            xlabel="forget tokens seen by a plain run (N)", ylabel="forget loss (uncalibrated)")
    ax2.set(yscale="log", title="leakage = N_equivalent / undiscovered forget tokens seen",
            xlabel="undiscovered forget data (%)", ylabel="leakage")
    ax2.axhspan(0.005, 0.02, color="tab:green", alpha=0.15, label="paper, 64M: 0.005-0.02")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    claims = []
    if rows:
        vals = [r["leakage"] for r in rows if r["leakage"] is not None]
        claims.append({"claim": "leakage is two orders of magnitude below filtering's (1 by definition): <= 0.05",
                       "paper": "0.005-0.02 at 64M for undiscovered rates up to 40%",
                       "here": f"{min(vals):.3g}-{max(vals):.3g}" if vals else "-",
                       "holds": bool(vals) and max(vals) <= 0.05})
        sizes = sorted({(r["n_params"], r["size"]) for r in rows})
        if len(sizes) > 1:
            per = {s: _mean(r["leakage"] for r in rows if r["size"] == s) for _, s in sizes}
            seq = [per[s] for _, s in sizes]
            claims.append({"claim": "leakage falls with model size", "paper": "8M -> 64M: falls",
                           "here": ", ".join(f"{s}: {per[s]:.3g}" for _, s in sizes),
                           "holds": all(a >= b for a, b in zip(seq, seq[1:]))})
    payload = {"title": "Leakage", "command": command, "inputs": [str(s) for s in sweeps], "table": rows,
               "curves": curves, "claims": claims,
               "notes": ["N counts the forget tokens a plain run trained on (weak filter at a small undiscovered "
                         "rate), replayed from the loader; bound=below: SGTM forgot more than the N=0 run; "
                         "bound=above: less than the largest dose (leakage is then a lower bound)"]}
    write_analysis(out, "leakage", payload, fig)
    return payload


# ------------------------------------------------------------------------------- compute penalty


def compute_penalty_analysis(sweeps: list[str], out: str, command: str, from_history: bool = False) -> dict:
    """Fit loss = a * C^-b on the no-filter runs of several sizes (C = 6 * params * tokens), per set,
    and express every other run's deployed loss as the compute fraction it gave up.

    ``from_history`` also uses every intermediate evaluation of the no-filter runs as a (C, loss)
    point (C from the tokens seen by then): a one-size stand-in when several sizes are not
    available; the points before the end of the cosine schedule are not converged."""
    cells = [c for c in load_cells(sweeps) if c["done"]]
    plain = [c for c in cells if c["strategy"] == "none" and c["filter"] == "none"]
    compute = {c["key"]: 6.0 * c["n_params"] * c["tokens"] for c in cells}
    fits, rows = {}, []
    fig, axes = figure(3, width=5)
    for ax, s in zip(axes, SETS):
        if from_history:
            pts = [(6.0 * c["n_params"] * c["tokens_per_step"] * r["step"], loss(r, s, "full"))
                   for c in plain for r in c["history"]]
        else:
            pts = [(compute[c["key"]], loss(c["final"], s, "full")) for c in plain]
        pts = [p for p in pts if p[1] is not None]
        if len({p[0] for p in pts}) < 2:
            ax.set_visible(False)
            continue
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        fits[s] = fit
        cs = np.geomspace(min(p[0] for p in pts) / 2, max(p[0] for p in pts) * 2, 50)
        ax.plot(cs, fit["a"] * cs ** -fit["b"], "k--", lw=1, label=f"fit a*C^-b, b={fit['b']:.3f}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "ko", label="no filter")
        for c in cells:
            if c in plain or c["history"] is None:
                continue
            v = deployed(c, s)
            if v is None:
                continue
            m = method_of(c)
            pen = compute_penalty(fit["a"], fit["b"], v, compute[c["key"]])
            raw = loss(c["final"], s, "ablated") if deployed_kind(c) == "calibrated" else v
            rows.append({"set": s, "method": m, "size": size_label(c), "undiscovered_rate": c["undiscovered_rate"],
                         "seed": c["seed"], "compute_flops": compute[c["key"]], "loss": v, "penalty": pen,
                         "loss_uncalibrated": raw,
                         "penalty_uncalibrated": compute_penalty(fit["a"], fit["b"], raw, compute[c["key"]])})
            ax.plot([compute[c["key"]]], [v], "o", color=COLORS.get(m, "tab:olive"), ms=5)
        ax.set(xscale="log", yscale="log", title=f"{s} loss vs compute", xlabel="C = 6 N D (FLOPs)",
               ylabel="loss (deployed model)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    summary = defaultdict(list)
    for r in rows:
        summary[(r["set"], r["method"])].append((r["penalty"], r["penalty_uncalibrated"]))
    table = [{"set": s, "method": m, "penalty_mean": float(np.mean([x[0] for x in v])),
              "penalty_uncalibrated_mean": float(np.mean([x[1] for x in v])), "runs": len(v)}
             for (s, m), v in sorted(summary.items())]
    paper = {("retain", "sgtm"): "5%", ("retain", "weak_filter"): "-10%", ("retain", "strict_filter"): "-15%",
             ("forget", "sgtm"): "99%", ("forget", "weak_filter"): "95%", ("forget", "strict_filter"): "96%"}
    claims = [{"claim": f"compute penalty on {r['set']} for {r['method']}",
               "paper": paper[(r["set"], r["method"])] + " (Wikipedia 254M; retain = general knowledge)",
               "here": f"{100 * r['penalty_mean']:.0f}%" + (
                   f" (uncalibrated ablated: {100 * r['penalty_uncalibrated_mean']:.0f}%)"
                   if r["penalty_uncalibrated_mean"] != r["penalty_mean"] else ""), "holds": None}
              for r in table if (r["set"], r["method"]) in paper]
    payload = {"title": "Compute penalty", "command": command, "inputs": [str(s) for s in sweeps],
               "fits": fits, "table": table, "runs": rows, "claims": claims,
               "notes": ["penalty = 1 - C_equivalent / C: C_equivalent is the compute at which the no-filter fit "
                         "reaches the run's deployed loss. Positive: the method costs compute on that set; "
                         "on the forget set a large penalty is the goal.",
                         "Fit on no-filter runs of several sizes at a fixed step count (not 20 tokens/param)."
                         if not from_history else "Fit on the intermediate evaluations of the no-filter run(s) "
                         "(--from-history): compute varies by tokens seen, not by model size."]}
    write_analysis(out, "compute_penalty", payload, fig)
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
               f"{100 * res['share_of_increase_from_top_10pct_tokens']:.0f}% of the increase",
               "holds": res["share_tokens_down"] < 0.5 and res["share_of_increase_from_top_10pct_tokens"] < 0.5}]
    payload = {"title": "Per-token forget loss before/after ablation", "command": command, "inputs": [str(run)],
               "results": res, "table": rows, "claims": claims}
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


def _steps(v) -> float:
    """Steps to a threshold; '>N' (not reached in N steps) counts as just above N."""
    return float(v[1:]) + 0.5 if isinstance(v, str) else float(v)


def attacks(runs: list[str], out: str, command: str, thresholds: list[float] | None = None) -> dict:
    """All fine-tuning attack results (``attack*.analysis.json`` under ``runs``) on one plot, with
    steps to reach each threshold: the no-filter model's forget loss (the paper's criterion) and
    any extra ``thresholds`` (useful when short attacks never get all the way back)."""
    from pipeline.experiments.stats import steps_to_threshold

    found = sorted({p.resolve() for r in runs for p in Path(r).rglob("attack*.analysis.json")
                    if p.name != "attacks.analysis.json"})
    if not found:
        raise FileNotFoundError("attacks: no attack*.analysis.json under " + ", ".join(map(str, runs)))
    results = {json.loads(p.read_text())["analysis"]: json.loads(p.read_text())["results"] for p in found}
    ref = next((r["threshold"] for r in results.values() if r.get("threshold") is not None), None)
    levels = ([ref] if ref is not None else []) + list(thresholds or [])
    fig, (ax,) = figure(1, width=7.5)
    rows = []
    for name, r in sorted(results.items()):
        h = r["history"]
        steps, fl = [x["step"] for x in h], [x["forget_loss"] for x in h]
        ax.plot(steps, fl, "o-", ms=3, label=name.removeprefix("attack_"),
                color=COLORS.get(name.removeprefix("attack_"), None))
        row = {"attack": name, "start_forget": fl[0], "end_forget": fl[-1], "steps_run": steps[-1],
               "tokens_per_step": r["tokens_per_step"], "retain_start": h[0]["retain_loss"],
               "retain_end": h[-1]["retain_loss"]}
        for lv in levels:
            hit = steps_to_threshold(steps, fl, lv)
            row[f"steps_to_{lv:.3f}"] = hit["step"] if hit["step"] is not None else f">{steps[-1]}"
        rows.append(row)
    for i, lv in enumerate(levels):
        ax.axhline(lv, color="k", ls="--" if i == 0 else ":", lw=1,
                   label="no-filter model's forget loss" if i == 0 and ref is not None else f"threshold {lv:.3f}")
    ax.set(title="fine-tuning attack: held-out forget loss", xlabel="attack step", ylabel="forget loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    claims = []
    by = {r["attack"]: r for r in rows}
    if ref is not None and "attack_sgtm" in by and "attack_rmu" in by:
        k = f"steps_to_{ref:.3f}"
        claims.append({"claim": "SGTM resists fine-tuning longer than RMU", "paper": "RMU 50 steps; SGTM 350 (~7x)",
                       "here": f"RMU {by['attack_rmu'][k]} steps, SGTM {by['attack_sgtm'][k]} steps",
                       "holds": _steps(by["attack_sgtm"][k]) > _steps(by["attack_rmu"][k])})
    payload = {"title": "Fine-tuning attacks compared", "command": command, "inputs": [str(p) for p in found],
               "table": rows, "claims": claims,
               "notes": ["steps_to_X: first evaluated attack step whose held-out forget loss is <= X "
                         "(>N: not reached in the N steps run)"]}
    write_analysis(out, "attacks", payload, fig)
    return payload
