"""Checkpoints through DeepSpeed's ``save_checkpoint``, made crash-safe.

Layout of ``<run>/checkpoints``::

    step00000100/            DeepSpeed's files (model + optimizer shards, client state)
    step00000100/rank00001.json   per-rank state DeepSpeed does not keep per rank (loader, RNG)
    step00000100/COMPLETE    written last, after every rank finished
    latest                   the newest COMPLETE tag, replaced atomically (tmp + rename)

A crash mid-write leaves a tag without COMPLETE, which is never chosen: resume reads ``latest``
and, should it be stale or damaged, falls back to the newest complete tag.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"


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


def save(engine, root: Path, step: int, client_state: dict, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = Path(root)
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        stale = root / tag
        if stale.exists():  # an incomplete attempt at this step from a crashed run
            shutil.rmtree(stale)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    atomic_write_text(root / tag / f"rank{rank:05d}.json", json.dumps(rank_state))
    dist.barrier()
    if rank == 0:
        atomic_write_text(root / tag / COMPLETE, json.dumps({"step": step}))
        atomic_write_text(root / LATEST, tag)
        for old in complete_tags(root)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load(engine, root: Path, tag: str) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler; return (client_state, this rank's state)."""
    root = Path(root)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rank_file = root / tag / f"rank{dist.get_rank():05d}.json"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file}: missing; was the checkpoint written by a different world size?")
    return client_state, json.loads(rank_file.read_text())
