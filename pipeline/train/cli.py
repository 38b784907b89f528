"""`sgtm train | eval | ablate | consolidate | export-hf`: what a user runs around the train loop
(`sgtm demo` registers itself: :mod:`pipeline.demo`)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train an experiment (any launcher: python, torchrun, deepspeed, srun, mpirun)")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: forget/retain/adjacent loss, full/ablated/calibrated")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (runs/X/checkpoints/stepN) or a run dir")
    p.add_argument("--data", help="data config YAML (default: the checkpoint's own data section)")
    p.add_argument("--out", help="write the results JSON here (default: <checkpoint>/eval.json)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the checkpoint's config (eval.*)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("ablate", help="write the deployable model: forget parameters zeroed")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--domains", nargs="*", help="forget domains to remove (default: all)")
    p.add_argument("--calibrate", action="store_true", help="also fit and store the calibrated output bias")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_ablate)

    p = subparsers.add_parser("consolidate", help="merge TP shards of a checkpoint into one TP=1 model directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_consolidate)

    p = subparsers.add_parser("export-hf", help="write a HF transformers model directory (safetensors + tokenizer)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or an ablated model directory")
    p.add_argument("--out", required=True)
    p.add_argument("--drop-calibration", action="store_true",
                   help="export a calibrated model without its output bias (llama: the bias cannot be carried)")
    p.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.backend.distributed import shutdown_distributed
    from pipeline.config import load_config
    from pipeline.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result and int(__import__("os").environ.get("RANK", "0")) == 0:
        print(json.dumps(result), file=sys.stderr)
    shutdown_distributed()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.train.offline import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, overrides=args.overrides, out=args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from pipeline.train.offline import ablate_checkpoint

    path = ablate_checkpoint(args.checkpoint, args.out, domains=args.domains, calibrate=args.calibrate)
    print(f"wrote {path}")
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from pipeline.train.offline import consolidate_checkpoint

    print(f"wrote {consolidate_checkpoint(args.checkpoint, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.train.export_hf import export_hf

    path = export_hf(args.checkpoint, args.out, drop_calibration=args.drop_calibration)
    print(f"wrote {path}")
    return 0
