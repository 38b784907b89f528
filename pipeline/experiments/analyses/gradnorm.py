"""`sgtm analyze gradnorm`: per-example relative gradient norms of the forget vs retain parameters
(paper Fig. 4b). The measurement needs the model, so it lives beside the attack in
:mod:`pipeline.experiments.finetune`; this file is its place in the CLI and the report."""

from __future__ import annotations

import argparse

from pipeline.experiments.analyses.registry import Analysis, register


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or model dir (the full model)")
    parser.add_argument("--examples", type=int, default=48, help="held-out examples per set")
    parser.add_argument("--out", required=True)


def _run(args: argparse.Namespace, command: str) -> dict:
    from pipeline.experiments.finetune import gradnorm  # torch: loaded when the analysis runs, not for the CLI

    return gradnorm(args.checkpoint, args.out, command, examples=args.examples)


register(Analysis(
    name="gradnorm", help="per-example relative gradient norms of forget vs retain params (Fig. 4b)", run=_run,
    arguments=_arguments, summaries=("gradnorm",), expected={"bilingual": ("gradnorm",)},
    cli_order=130, report_order=150, pending_order=130))
