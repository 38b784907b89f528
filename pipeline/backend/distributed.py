"""Process groups: rank discovery from any launcher, DeepSpeed's comm, megatron's parallel_state
(TP, PP, DP and EP groups), the ``mpu`` DeepSpeed expects, and the local launcher.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK; mpirun sets OMPI_*/PMI_*
(read through mpi4py when it is installed); a bare ``srun`` sets SLURM_*. A plain ``python``
process becomes a world of one on loopback.

Expert parallelism (``engine.expert_parallel``, the MoE of :mod:`pipeline.model.moe`): the EP
group is megatron's (consecutive ranks, nested with TP). The ranks of an EP group share their
batch, like TP ranks, so the ranks with other data (:func:`data_parallel_group`) are megatron's
data-parallel group or, when the EP group contains the TP group (EP > TP), its
expert-data-parallel group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import EngineConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    backend: str
    pp_rank: int = 0  # pipeline stage (engine.pipeline_parallel)
    pp_size: int = 1


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local_ranks(argv: list[str], nprocs: int, log_dir: Path, env: dict[str, str] | None = None,
                      cwd: Path | None = None, timeout: float = 900, device: str = "cpu") -> None:
    """Run ``argv`` as ``nprocs`` ranks of one world on this machine (what torchrun does, without
    its agent): the benchmark and the multi-process tests start their workers here. Each rank's
    output goes to ``log_dir/rank{i}.log``; if any rank fails or times out, all are killed and the
    error carries the first failing rank's log tail."""
    import subprocess

    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        rank_env = dict(os.environ if env is None else env, RANK=str(rank), WORLD_SIZE=str(nprocs),
                        LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if device == "cpu":
            rank_env["GLOO_SOCKET_IFNAME"] = "lo"
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(argv, env=rank_env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append((rank, rc))
    if failed:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        tail = (log_dir / f"rank{failed[0][0]}.log").read_text()[-4000:]
        raise RuntimeError(f"local ranks failed (rank, exit code) {failed}: {' '.join(argv[:4])}\n{tail}")


def discover_ranks() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from whichever launcher started us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        try:
            from mpi4py import MPI  # noqa: F401  (initialises MPI; the env below is then set)

            comm = MPI.COMM_WORLD
            rank, size = comm.Get_rank(), comm.Get_size()
        except ImportError:
            rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0)))
            size = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1)))
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(size)
        env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0")))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    else:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def resolve_device(cfg: EngineConfig) -> tuple[torch.device, str]:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device: 'cuda' requested but no CUDA device is available")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if device == "cpu":
        # Must precede the first deepspeed import: picks DeepSpeed's CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device(device), backend


# ---- expert parallelism -------------------------------------------------------------------


def ep_world() -> tuple[int, int]:
    """(EP rank, EP size) from megatron's parallel_state (1 group of 1 when EP is off)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()


def ep_outside_tp() -> bool:
    """Does the EP group contain the TP group (EP > TP)? Then the ranks sharing a batch are the EP group."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_world_size() > ps.get_tensor_model_parallel_world_size()


def data_parallel_group():
    """The ranks holding other data: megatron's data-parallel group, or, when the EP group
    contains the TP group (EP > TP), megatron's expert-data-parallel group (built with expert
    tensor parallel 1, it is the ranks with the same EP rank)."""
    from megatron.core import parallel_state as ps

    if ep_outside_tp():
        return ps.get_expert_data_parallel_group()
    return ps.get_data_parallel_group()


def data_parallel_rank_size() -> tuple[int, int]:
    g = data_parallel_group()
    return torch.distributed.get_rank(group=g), torch.distributed.get_world_size(group=g)


def counts_once(p: torch.Tensor) -> bool | None:
    """For norms summed over every rank: False if ``p`` is an expert-parallel copy another rank
    already counts, True if an expert weight this rank counts, None (decide as for TP) otherwise.
    Experts are replicated over the TP ranks outside their EP group (EP < TP); non-expert
    parameters over the TP groups inside an EP group (EP > TP). ``p.expert_parallel`` marks an
    expert's parameter (:mod:`pipeline.model.moe`)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    ep_rank, ep = ep_world()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if getattr(p, "expert_parallel", False):
        return tp_rank // ep == 0
    if ep > tp and ep_rank // tp != 0:
        return False
    return None


class MegatronMPU:
    """The ``mpu`` DeepSpeed expects, mapping its "model parallel" onto megatron's TP group."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.ps = ps

    # With expert parallelism the ranks sharing a batch are the TP group or, when it is larger,
    # the EP group: DeepSpeed's "model parallel" is the larger of the two, its data parallel the
    # ranks with other data (:func:`data_parallel_group`).
    def get_data_parallel_group(self):
        return data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(group=self.get_data_parallel_group())

    def get_data_parallel_rank(self) -> int:
        return torch.distributed.get_rank(group=self.get_data_parallel_group())

    def get_model_parallel_group(self):
        if ep_outside_tp():
            return self.ps.get_expert_model_parallel_group()
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(group=self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(group=self.get_model_parallel_group())

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()


def init_distributed(cfg: EngineConfig) -> DistInfo:
    """Idempotent: joins the process group and builds megatron's TP/DP groups."""
    device, backend = resolve_device(cfg)
    discover_ranks()
    import deepspeed
    from megatron.core import parallel_state as ps

    world = int(os.environ["WORLD_SIZE"])
    pp = int(getattr(cfg, "pipeline_parallel", 1))
    if world % cfg.tensor_parallel:
        raise ValueError(f"engine.tensor_parallel: {cfg.tensor_parallel} does not divide the world size {world}")
    if world % (cfg.tensor_parallel * pp):
        raise ValueError(f"engine.pipeline_parallel: the world size {world} is not divisible by engine.tensor_parallel "
                         f"x engine.pipeline_parallel = {cfg.tensor_parallel} x {pp}")
    if device.type == "cpu":
        from pipeline.backend.deepspeed_internals import skip_shm_build

        skip_shm_build()
    timeout_s = float(getattr(cfg, "dist_timeout_s", 1800.0))
    if not torch.distributed.is_initialized():
        from datetime import timedelta

        # Groups built on an earlier (destroyed) default group are dead handles: rebuild them.
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    ep = int(getattr(cfg, "expert_parallel", 1))
    if ep > 1 and world % (ep * pp):
        raise ValueError(f"engine.expert_parallel: {ep} does not divide the world size {world}")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size()) != (cfg.tensor_parallel, pp, ep):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        # Megatron's rank order tp-cp-ep-dp-pp (TP fastest, PP slowest) is DeepSpeed's
        # PipeModelDataParallelTopology order (axes pipe, data, model): pipeline/engine/pipe.py.
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel,
                                     pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=timeout_s / 60,
                                     # MoE: the EP group of consecutive ranks, nested with TP (moe.py)
                                     **({"expert_model_parallel_size": ep, "expert_tensor_parallel_size": 1}
                                        if ep > 1 else {}))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if ep > 1:  # ranks of an EP group share their batch
        dp_rank, dp_size = data_parallel_rank_size()
    return DistInfo(
        rank=torch.distributed.get_rank(), world_size=world, local_rank=int(os.environ["LOCAL_RANK"]),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=dp_rank, dp_size=dp_size,
        device=device, backend=backend, pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size())


def shutdown_distributed() -> None:
    """Leave together, then tear down every group.

    Without the barrier rank 0 (the rendezvous store's host) may exit while another rank's store
    thread still runs, which aborts that rank ('terminate called without an active exception',
    exit -6) after a successful run. Megatron's groups go too, so a later ``init_distributed`` in
    the same process (a notebook, a test) builds fresh ones instead of reusing dead handles.
    """
    from megatron.core import parallel_state as ps

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
