#!/usr/bin/env python
"""What the training loss's fixed denominator changes, measured on the demo's SGTM run.

The training loss divides the summed per-token losses by the micro-batch's B x S positions
(:func:`pipeline.model.transformer.training_loss`). It used to divide by the number of labelled
positions, forget ones included: a count the forget labels decide, which scaled every retain
gradient (the count channel, docs/architecture.md "The invariant"). This trains the demo's SGTM
run twice from the same data and seed, once per denominator, and writes the final evaluation of
both and the labelled share of the training positions (the ratio of the two denominators).

    python tools/loss_normalisation.py --out runs/loss_normalisation --json docs/measurements/loss_normalisation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = [f"{s}_{k}" for s in ("forget", "retain") for k in ("full", "ablated", "calibrated")]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/loss_normalisation")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: the demo's)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)

    from pipeline.demo import run_demo
    from pipeline.model import transformer

    fixed = transformer.training_loss
    shares: list[float] = []

    def counting(denominator):
        def loss(t):
            if t.requires_grad:  # training forwards only
                shares.append(float((t != 0).float().mean()))
            return denominator(t)
        return loss

    labelled_count = lambda t: t.sum() / (t != 0).sum().clamp(min=1)  # noqa: E731 (ignored positions are exactly 0)
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    out, summary = Path(args.out), {}
    try:
        for name, denominator in (("fixed_BxS", fixed), ("labelled_count", labelled_count)):
            shares.clear()
            transformer.training_loss = counting(denominator)
            res = run_demo(out / name, overrides, methods=["sgtm"])
            row = res["final"]["sgtm"]
            summary[name] = {k: row.get(k) for k in KEYS}
            summary[name]["labelled_share"] = sum(shares) / max(1, len(shares))
    finally:
        transformer.training_loss = fixed
    summary["difference_fixed_minus_labelled"] = {k: summary["fixed_BxS"][k] - summary["labelled_count"][k]
                                                  for k in KEYS if summary["fixed_BxS"][k] is not None}
    summary["command"] = "python tools/loss_normalisation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
