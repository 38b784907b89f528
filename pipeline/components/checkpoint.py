"""Checkpoints through DeepSpeed's ``save_checkpoint``, made crash-safe.

Layout of ``<run>/checkpoints``::

    step00000100/            DeepSpeed's files (model + optimizer shards, client state)
    step00000100/rank00001.json   per-rank state DeepSpeed does not keep per rank (loader, RNG)
    step00000100/COMPLETE    written last, after every rank finished
    latest                   the newest COMPLETE tag, replaced atomically (tmp + rename)

A crash mid-write leaves a tag without COMPLETE, which is never chosen: resume reads ``latest``
and, should it be stale or damaged, falls back to the newest complete tag. A failed write
(disk full, read-only file system) on any rank is agreed on by all ranks after DeepSpeed's
collectives finished, the partial tag is removed, ``latest`` is left alone and the error is
one line (:class:`CheckpointError`). :func:`preflight` checks writability and free space for
one checkpoint before anything expensive is built.

Loading never unpickles code: DeepSpeed 0.19.8's ``TorchCheckpointEngine.load`` calls
``torch.load(weights_only=False)``; :func:`load` swaps in a loader with ``weights_only=True``
and an allow-list of the plain DeepSpeed classes its optimizer files hold, so a crafted
pickle is refused (one line naming the file) before any of its code can run. Both patches, and
the write guard's, go through :mod:`pipeline.engine.deepspeed_internals`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.components import faults
from pipeline.engine import deepspeed_internals as dsi

COMPLETE = "COMPLETE"
LATEST = "latest"
BYTES_PER_PARAM = {"fp32": 16, "bf16": 14}  # weights + fp32 master (bf16) + Adam exp_avg, exp_avg_sq


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or must not be read; one line naming the path."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    """Every RNG a step may touch, as JSON-able data."""
    buf = io.BytesIO()
    torch.save({"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, buf)
    np_state = np.random.get_state()
    return {"torch": base64.b64encode(buf.getvalue()).decode(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    saved = torch.load(io.BytesIO(base64.b64decode(state["torch"])), weights_only=True)
    torch.set_rng_state(saved["torch"])
    if torch.cuda.is_available() and saved["cuda"]:
        torch.cuda.set_rng_state_all(saved["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_tag(root: Path) -> str | None:
    """The tag to resume from: ``latest`` if it names a complete checkpoint, else the newest complete."""
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


# ------------------------------------------------------------------------------ preflight


def estimate_bytes(n_params: int, precision: str = "fp32") -> int:
    """Size of one checkpoint: every parameter's weights and Adam states, plus 1 MiB of metadata."""
    return n_params * BYTES_PER_PARAM.get(precision, 16) + (1 << 20)


def preflight(root: Path, needed_bytes: int) -> None:
    """Refuse to start when ``root`` cannot take one checkpoint: not writable, or too little free
    space. Called before the engine is built; creates ``root``."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_probe.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"{root}: checkpoint directory is not writable ({exc.strerror or _first_line(exc)})") \
            from None
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise CheckpointError(f"{root}: {free / 2**20:.1f} MiB free, one checkpoint needs about "
                              f"{needed_bytes / 2**20:.1f} MiB (parameters x (weights + Adam states))")


# ------------------------------------------------------------------------------ save


def _as_oserror(exc: BaseException, target) -> OSError:
    """torch.save's zip writer reports a full disk as ``RuntimeError: ... iostream error``
    without errno: diagnose from the free space left."""
    if isinstance(exc, OSError):
        return exc
    import errno

    try:
        free = shutil.disk_usage(os.path.dirname(str(target)) or ".").free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return OSError(errno.EIO, f"write failed: {_first_line(exc)[:120]}", str(target))


class _WriteGuard:
    """Around DeepSpeed's ``save_checkpoint``: the first failing write is recorded and later ones
    are skipped, so DeepSpeed still runs all of its collectives and every rank reaches the
    agreement in :func:`save` instead of hanging in a barrier a failed rank never entered."""

    def __init__(self, engine, step: int) -> None:
        self.engine, self.step = engine, step
        self.error: tuple[str, OSError] | None = None
        self._restore = None

    def _guard(self, name: str, fn, path):
        def guarded(*args, **kwargs):
            if self.error is not None:
                return None
            target = path(*args, **kwargs)
            try:
                if name == "save" and faults.armed("enospc_in_save", self.step):
                    raise faults.enospc(target)
                return fn(*args, **kwargs)
            except (OSError, RuntimeError) as exc:  # torch.save's C++ writer raises RuntimeError
                self.error = (str(target), _as_oserror(exc, target))
                return None
        return guarded

    def __enter__(self):
        self._restore = dsi.wrap_checkpoint_writes(self.engine, self._guard)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def _agree(failed: bool) -> bool:
    """Did any rank fail? (NCCL reduces CUDA tensors only.)"""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def save(engine, root: Path, step: int, client_state: dict, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    A write error on any rank (disk full, read-only) raises :class:`CheckpointError` on every
    rank after removing the partial directory; ``latest`` and older checkpoints are untouched."""
    root = Path(root)
    tag = tag_for(step)
    rank = dist.get_rank()
    error: tuple[str, OSError] | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            stale = root / tag
            if stale.exists():  # an incomplete attempt at this step from a crashed run
                shutil.rmtree(stale)
        except OSError as exc:
            error = (str(root / tag), exc)
    if not _agree(error is not None):
        with _WriteGuard(engine, step) as guard:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        error = guard.error
        if error is None:
            try:
                atomic_write_text(root / tag / f"rank{rank:05d}.json", json.dumps(rank_state))
            except OSError as exc:
                error = (str(root / tag / f"rank{rank:05d}.json"), exc)
    failed = _agree(error is not None)
    if not failed and faults.armed("kill_in_save", step):
        faults.kill_self()  # DeepSpeed's files and the rank files are written; COMPLETE is not
    if not failed and rank == 0:
        try:
            atomic_write_text(root / tag / COMPLETE, json.dumps({"step": step}))
            atomic_write_text(root / LATEST, tag)
        except OSError as exc:
            error = (str(root / tag / COMPLETE), exc)
            (root / tag / COMPLETE).unlink(missing_ok=True)
    failed = _agree(error is not None)
    if failed:
        if rank == 0:
            shutil.rmtree(root / tag, ignore_errors=True)
        dist.barrier()
        where, exc = error if error is not None else (str(root / tag), None)
        why = (exc.strerror or _first_line(exc)) if exc is not None else "failed on another rank"
        raise CheckpointError(f"{where}: checkpoint of step {step} not written ({why}); "
                              f"latest is still {latest_tag(root)}")
    if rank == 0:
        for old in complete_tags(root)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


# ------------------------------------------------------------------------------ load


def safe_torch_load(path: str | Path, map_location=None):
    """``torch.load`` with ``weights_only=True``: tensors, containers and allow-listed classes;
    anything else (a pickled callable, ``__reduce__`` payloads) is refused before it runs."""
    try:
        with torch.serialization.safe_globals(dsi.checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        detail = _first_line(exc)
        if "Weights only load failed" in detail or isinstance(exc, pickle.UnpicklingError):
            for line in str(exc).splitlines():
                if "Unsupported" in line or "GLOBAL" in line or "global" in line:
                    detail = line.strip()
                    break
            raise CheckpointError(f"{path}: refused to load, not a weights-only checkpoint ({detail[:200]})") \
                from None
        raise CheckpointError(f"{path}: unreadable checkpoint file ({detail[:200]})") from None


def use_safe_loader(engine) -> None:
    """Make every ``torch.load`` DeepSpeed does for this engine (model, ZeRO optimizer states)
    go through :func:`safe_torch_load`."""

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    dsi.set_checkpoint_loader(engine, load)


def load(engine, root: Path, tag: str) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler; return (client_state, this rank's state)."""
    root = Path(root)
    if not (root / tag / COMPLETE).is_file():
        raise CheckpointError(f"{root / tag}: no {COMPLETE} marker; refusing a partially written checkpoint")
    use_safe_loader(engine)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rank_file = root / tag / f"rank{dist.get_rank():05d}.json"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file}: missing; was the checkpoint written by a different world size?")
    return client_state, json.loads(rank_file.read_text())
