"""The generic entry point of every multi-process test scenario (tests/support/launch.py):

    python -m tests.support.worker MODULE:FUNCTION '{"out": DIR, ...}'

on each rank: imports MODULE (a test module), calls ``FUNCTION(Path(out), **rest)``; rank 0 writes
the returned value to ``out/result.json``; then a barrier and the process group torn down."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed
    target, args = argv[0], json.loads(argv[1])
    module, name = target.split(":")
    scenario = getattr(importlib.import_module(module), name)
    out = Path(args.pop("out"))
    result = scenario(out, **args)

    import torch.distributed as dist

    from tests.support.launch import write_result

    if int(os.environ["RANK"]) == 0:
        write_result(out, result)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
