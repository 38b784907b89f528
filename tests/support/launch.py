"""The one multi-process launcher of the tests: N local ranks on loopback gloo.

``run_scenario(2, scenario_fn, out, **kwargs)`` runs ``scenario_fn(out, **kwargs)`` on every rank
(``python -m tests.support.worker module:function JSON``, started by
:func:`pipeline.backend.distributed.spawn_local_ranks`, which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1 and MASTER_PORT) and returns what rank 0's call returned (JSON). The
scenario function lives in the test module beside the assertions on its result; tensors go to
files under ``out``, next to each rank's log (``out/rank{i}.log``).

``start_ranks`` starts ``sgtm train`` on N ranks and returns the processes, for the
tests that kill or signal live ranks (spawn_local_ranks waits for every rank to exit); each rank's
environment is the one spawn_local_ranks gives, plus an optional per-rank fault (SGTM_FAULT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.backend.distributed import free_port, spawn_local_ranks
from tests.support import ROOT

RESULT = "result.json"


def scenario_name(scenario: Callable | str) -> str:
    """``module:function`` for a module-level function (or that string itself)."""
    if isinstance(scenario, str):
        return scenario
    name = f"{scenario.__module__}:{scenario.__qualname__}"
    if scenario.__module__ == "__main__" or "." in scenario.__qualname__:
        raise ValueError(f"{name}: a scenario must be a module-level function of an importable module")
    return name


def base_env() -> dict[str, str]:
    """The environment every rank starts from: CPU DeepSpeed, one thread, the checkout importable,
    no fault armed (a scenario arms its own)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SGTM_FAULT", None)
    return env


def run_scenario(nprocs: int, scenario: Callable | str, out: Path, timeout: float = 600, **kwargs):
    """Run ``scenario(out, **kwargs)`` on ``nprocs`` local gloo ranks; return rank 0's result.

    Any rank failing or running past ``timeout`` seconds kills them all and raises with the first
    failing rank's log tail."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)  # never read an earlier launch's result
    argv = [sys.executable, "-m", "tests.support.worker", scenario_name(scenario), json.dumps({"out": str(out),
                                                                                               **kwargs})]
    spawn_local_ranks(argv, nprocs, out, env=base_env(), cwd=ROOT, timeout=timeout)
    return json.loads((out / RESULT).read_text())


def write_result(out: Path, result) -> None:
    """Rank 0's result, written atomically (the worker does this when the scenario returns; a
    scenario that must leave with ``os._exit`` calls it first)."""
    tmp = Path(out) / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(Path(out) / RESULT)


# ------------------------------------------------------------------------------ live ranks


def start_ranks(nprocs: int, args: list[str], log: Path, faults: dict[int, str] | None = None
                ) -> list[subprocess.Popen]:
    """``sgtm train ARGS`` on ``nprocs`` local ranks, each in its own session (so a
    test can kill its process group), output to ``log.rank{i}.log``; ``faults[rank]`` arms
    SGTM_FAULT on that rank."""
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        env = dict(base_env(), RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo")
        if faults and rank in faults:
            env["SGTM_FAULT"] = faults[rank]
        out = open(rank_log_path(log, rank), "w")
        argv = [sys.executable, "-m", "pipeline", "train", *args]
        procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        out.close()  # the child holds its own descriptor
    return procs


def rank_log_path(log: Path, rank: int) -> Path:
    return Path(log).with_suffix(f".rank{rank}.log")


def rank_log(log: Path, rank: int) -> str:
    return rank_log_path(log, rank).read_text()


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> tuple[list, float]:
    """Wait for every rank; returns (exit codes, "hung" for a rank killed at ``timeout``; seconds
    until the last one exited)."""
    t0 = time.time()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            codes.append("hung")
    return codes, time.time() - t0


def wait_all(procs: list[subprocess.Popen], log: Path, timeout: float = 600) -> None:
    """Every rank exits 0 within ``timeout`` seconds each, or AssertionError with rank 0's log tail."""
    for p in procs:
        rc = p.wait(timeout=timeout)
        if rc != 0:
            raise AssertionError(f"rank exited {rc}:\n" + rank_log(log, 0)[-3000:])

