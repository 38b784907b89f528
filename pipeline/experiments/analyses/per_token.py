"""`sgtm analyze per-token`: whether ablation shifts the whole per-token forget-loss distribution
or a few extreme tokens (one run)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.experiments.analyses.registry import Analysis, register
from pipeline.experiments.common import (
    figure,
    write_analysis,
)


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


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run directory (its eval/*_per_token.npz)")
    parser.add_argument("--step", type=int, help="eval step (default: the last)")
    parser.add_argument("--out", required=True)


def _run(args: argparse.Namespace, command: str) -> dict:
    return per_token(args.run, args.out, command, args.step)


register(Analysis(
    name="per-token", help="per-token forget-loss distribution before/after ablation", run=_run,
    arguments=_arguments, summaries=("per_token",), expected={"bilingual": ("per_token",)},
    cli_order=120, report_order=160, pending_order=140))
