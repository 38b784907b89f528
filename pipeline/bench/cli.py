"""`sgtm bench`: training throughput and memory of the masking strategies, TP=1/2, and the
independent reference implementation (see :mod:`pipeline.bench.train_bench`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pipeline.errors import UserError

QUICK = {"sizes": ["tiny-1m"], "tp": [1], "rounds": 6, "warmup": 1, "mem_steps": 1}
FULL = {"sizes": ["tiny-1m", "small-4m"], "tp": [1, 2], "rounds": 12, "warmup": 2, "mem_steps": 4}
THROUGHPUT = "## Training throughput"
PROFILE = "## Profile"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"reduced run (under 5 minutes on 2 cores): {QUICK}")
    p.add_argument("--json", metavar="FILE", help="write the figures (ratios, rows, raw step times) here")
    p.add_argument("--doc", metavar="FILE", help="append the Markdown tables to FILE's '## Training throughput' "
                   "section (e.g. docs/benchmarks.md)")
    p.add_argument("--sizes", nargs="+", help=f"default {FULL['sizes']} (names in pipeline.bench.train_bench.SIZES "
                   "or configs/models fragments)")
    p.add_argument("--tp", type=int, nargs="+", help=f"tensor-parallel degrees, default {FULL['tp']}")
    p.add_argument("--strategies", nargs="+", default=["none", "sgtm", "gradient_routing"])
    p.add_argument("--rounds", type=int, help="timed rounds per speed process (one step of every variant each)")
    p.add_argument("--warmup", type=int, help="untimed rounds first")
    p.add_argument("--reps", type=int, default=1, help="speed processes per size and TP (their rounds are pooled)")
    p.add_argument("--mem-steps", type=int, help="steps of each memory process (after 2 warm-up steps)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data", choices=("bilingual", "synthetic", "mixed-spans"), default="bilingual",
                   help="bundled bilingual TinyStories through the real loader, or synthetic mixed-mode batches")
    p.add_argument("--no-reference", action="store_true", help="skip tools/reference_sgtm.py")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    p.add_argument("--no-doc-mask", action="store_true", help="plain causal attention (no doc_ids)")
    p.add_argument("--profile", action="store_true",
                   help="instead: torch profiler tables (none vs sgtm, TP=1) into the doc's '## Profile' section")
    p.add_argument("--profile-steps", type=int, default=3)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="training throughput/memory: strategies, TP, reference (no GPU needed)")
    add_arguments(p)
    p.set_defaults(func=run)


def settings(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    return {
        "sizes": args.sizes or base["sizes"], "tps": args.tp or base["tp"], "strategies": args.strategies,
        "rounds": args.rounds or base["rounds"], "warmup": base["warmup"] if args.warmup is None else args.warmup,
        "reps": args.reps, "mem_steps": args.mem_steps or base["mem_steps"], "micro_batch": args.micro_batch,
        "seq_len": args.seq_len, "data": args.data, "reference": not args.no_reference,
        "doc_mask": not args.no_doc_mask, "memory": not args.no_memory,
    }


def command_line(prog: str = "sgtm bench") -> str:
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[2 if prog == "sgtm bench" else 1:])])


def run(args: argparse.Namespace, prog: str = "sgtm bench") -> int:
    from pipeline.bench import train_bench

    cmd = command_line(prog)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.profile:
        from pipeline.bench import profile

        block = profile.profile_markdown(args.sizes[0] if args.sizes else "tiny-1m", args.micro_batch,
                                         args.seq_len, args.profile_steps, args.data, cmd, log=log)
        print(block)
        if args.doc:
            train_bench.add_to_section(Path(args.doc), PROFILE, block)
        return 0
    for strategy in args.strategies:
        if strategy not in train_bench.SHORT:
            raise UserError(f"--strategies: unknown strategy {strategy!r}")
    if "none" not in args.strategies:
        args.strategies = ["none", *args.strategies]
    result = train_bench.benchmark(**settings(args), log=log)
    block = train_bench.markdown(result, cmd)
    print(block)
    if args.doc:
        train_bench.add_to_section(Path(args.doc), THROUGHPUT, block)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, **result}, indent=1))
    return 0
