"""Shared fixtures: a one-process gloo world for in-process model tests, and a launcher for
multi-process scenarios (tests/dist_worker.py) that returns what rank 0 wrote."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.engine.distributed import free_port, spawn_local_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def single_process_world():
    """World of one process with megatron's parallel_state at TP=1 (in the pytest process).

    Joined once and then reused; joined again when an in-process ``sgtm train`` has left it."""
    import torch.distributed as dist

    from pipeline.config import EngineConfig
    from pipeline.engine.distributed import init_distributed

    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    return init_distributed(EngineConfig(tensor_parallel=1))


def run_workers(nprocs: int, scenario: str, out_dir: Path, timeout: int = 600, **kwargs) -> dict:
    """Run ``tests/dist_worker.py SCENARIO`` on ``nprocs`` local ranks (gloo, loopback only)."""
    args = json.dumps({"out": str(out_dir), **kwargs})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    spawn_local_ranks([sys.executable, str(ROOT / "tests" / "dist_worker.py"), scenario, args], nprocs, out_dir,
                      env=env, cwd=ROOT, timeout=timeout)
    return json.loads((out_dir / "result.json").read_text())
