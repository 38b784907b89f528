"""Shared fixtures: a one-process gloo world for in-process model tests, and a launcher for
multi-process scenarios (tests/dist_worker.py) that returns what rank 0 wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_world():
    """World of one process with megatron's parallel_state at TP=1 (in the pytest process)."""
    from pipeline.config import EngineConfig
    from pipeline.engine.distributed import init_distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    return init_distributed(EngineConfig(tensor_parallel=1))


def run_workers(nprocs: int, scenario: str, out_dir: Path, timeout: int = 600, **kwargs) -> dict:
    """Run ``tests/dist_worker.py SCENARIO`` on ``nprocs`` local ranks (gloo, loopback only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = json.dumps({"out": str(out_dir), **kwargs})
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_worker.py"), scenario, args],
                                       env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    failed = []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(rank)
    if failed:
        for _, p in procs:
            p.kill()
        tail = (out_dir / f"rank{failed[0]}.log").read_text()[-4000:]
        raise AssertionError(f"{scenario}: ranks {failed} failed\n{tail}")
    return json.loads((out_dir / "result.json").read_text())
