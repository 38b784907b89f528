"""The `sgtm` command. Each area registers its own subcommands; this file only wires them."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import __version__
from pipeline.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgtm", description="Selective Gradient Masking pretraining")
    parser.add_argument("--version", action="version", version=f"sgtm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from pipeline.bench.cli import register as register_bench
    from pipeline.commands.isolation import register as register_isolation_check
    from pipeline.commands.partition import register as register_partition
    from pipeline.data.cli import register as register_data
    from pipeline.demo import register as register_demo
    from pipeline.experiments.cli import register as register_experiments
    from pipeline.train.cli import register as register_train

    register_train(sub)
    register_demo(sub)
    register_partition(sub)
    register_isolation_check(sub)
    register_data(sub)
    register_bench(sub)
    register_experiments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError) as exc:
        # User-facing problems (bad config values, missing files, refused inputs) are one line;
        # SGTM_DEBUG=1 shows the traceback instead.
        if os.environ.get("SGTM_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sgtm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
