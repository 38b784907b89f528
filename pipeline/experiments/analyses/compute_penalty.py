"""`sgtm analyze compute-penalty`: a power law fitted on the no-filter runs turns every other
run's deployed loss into the compute fraction it gave up."""

from __future__ import annotations

import argparse
import math

import numpy as np

from pipeline.experiments.analyses.claims import (
    CAL,
    RAW,
    SETS,
    claim,
    group_by,
    seed_note,
)
from pipeline.experiments.analyses.plots import COLORS
from pipeline.experiments.analyses.registry import Analysis, register, sweep_arguments
from pipeline.experiments.common import (
    ci_text,
    coverage_note,
    deployed,
    figure,
    finished,
    loss,
    method_of,
    size_label,
    value,
    write_analysis,
)
from pipeline.experiments.stats import (
    CONFIDENCE,
    POWER_LAW_R2_FLOOR,
    compute_penalty,
    fit_power_law,
    t_interval,
)


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
    for (s, m, size), rs in sorted(group_by(runs, lambda r: (r["set"], r["method"], r["size"])).items()):
        iv, ivr = t_interval([r["penalty"] for r in rs]), t_interval([r["penalty_no_bias"] for r in rs])
        why = sorted({r["no_penalty"] for r in rs if "no_penalty" in r})
        table.append({"set": s, "method": m, "size": size, "seeds": len(rs), "penalty": iv["mean"],
                      "penalty_pm": None if iv["lo"] is None else iv["hi"] - iv["mean"],
                      "penalty_no_bias": ivr["mean"], **({"no_penalty": "; ".join(why)} if why else {})})
    paper = {("retain", "sgtm"): "5%", ("retain", "weak_filter"): "-10%", ("retain", "strict_filter"): "-15%",
             ("forget", "sgtm"): "99%", ("forget", "weak_filter"): "95%", ("forget", "strict_filter"): "96%"}
    claims = []
    for (s, m), rs in sorted(group_by(runs, lambda r: (r["set"], r["method"])).items()):
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
               "fits": fits, "table": table, "runs": runs, "claims": claims, "seeds": seed_note(
                   group_by(runs, lambda r: (r["set"], r["method"], r["size"]))) if runs else "0",
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


def _arguments(parser: argparse.ArgumentParser) -> None:
    sweep_arguments(parser)
    parser.add_argument("--from-history", action="store_true",
                        help="also fit on the no-filter runs' intermediate evaluations (one size suffices)")


def _run(args: argparse.Namespace, command: str) -> dict:
    extra = {"from_history": True} if args.from_history else {}
    return compute_penalty_analysis(args.sweeps, args.out, command, **extra)


register(Analysis(
    name="compute-penalty", help="power-law fit on no-filter runs -> equivalent compute of each method", run=_run,
    arguments=_arguments, summaries=("compute_penalty",),  # also compute_penalty_history (--from-history)
    expected={"bilingual": ("compute_penalty", "compute_penalty_history")},
    cli_order=50, report_order=60, pending_order=70))
