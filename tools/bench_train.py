"""Training throughput and memory benchmark (the full `sgtm bench`): strategies none / sgtm /
gradient_routing on the same engine and batches, sizes tiny-1m and small-4m, TP=1 and TP=2, and the
independent reference harness (tools/reference_sgtm.py) at TP=1; Markdown tables appended to
docs/benchmarks.md ('## Training throughput') unless --doc is given otherwise.

    .venv/bin/python tools/bench_train.py [--quick] [--json FILE] [--doc docs/benchmarks.md] [sgtm bench options]
    .venv/bin/python tools/bench_train.py --profile        # torch profiler tables into '## Profile'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.bench.cli import add_arguments, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(doc=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    return run(args, prog="tools/bench_train.py")


if __name__ == "__main__":
    sys.exit(main())
