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
the write guard's, go through :mod:`pipeline.backend.deepspeed_internals`.
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

from pipeline.backend import deepspeed_internals as dsi
from pipeline.components import faults

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


def save(engine, root: Path, step: int, client_state: dict, rank_state: dict, keep: int,
         layout: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    A write error on any rank (disk full, read-only) raises :class:`CheckpointError` on every
    rank after removing the partial directory; ``latest`` and older checkpoints are untouched.
    ``layout`` (:func:`layout_of`) goes into ``COMPLETE``: a resume on another layout reshards."""
    root = Path(root)
    client_state = {**client_state, "optimizer_params": optimizer_param_names(engine)}
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
            marker = {"step": step} if layout is None else {"step": step, "layout": layout}
            atomic_write_text(root / tag / COMPLETE, json.dumps(marker))
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


# ------------------------------------------------------------------------------ elastic resume


def layout_of(dist_info, engine_cfg) -> dict:
    """What a checkpoint's files depend on: world, DP and TP sizes, ZeRO stage, precision."""
    layout = {"world": int(dist_info.world_size), "dp": int(dist_info.dp_size), "tp": int(dist_info.tp_size),
              "zero_stage": int(engine_cfg.zero_stage), "precision": str(engine_cfg.precision)}
    if getattr(dist_info, "pp_size", 1) > 1:  # absent at PP=1, so earlier checkpoints' layouts still match
        layout["pp"] = int(dist_info.pp_size)
    if getattr(engine_cfg, "expert_parallel", 1) > 1:  # MoE experts split over EP ranks (pipeline/model/moe.py)
        layout["ep"] = int(engine_cfg.expert_parallel)
    return layout


def saved_layout(root: Path, tag: str) -> dict | None:
    """The layout recorded in a checkpoint's ``COMPLETE`` (None: written without one)."""
    try:
        return json.loads((Path(root) / tag / COMPLETE).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None


def optimizer_param_names(engine) -> list[list[str]] | None:
    """Parameter names in the plain torch optimizer's group order (ZeRO-0 fp32), which its
    state_dict numbers; ZeRO-1/2 files name their pieces themselves (None)."""
    plain = dsi.plain_optimizer(engine)
    if plain is None:
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in plain.param_groups]


def full_train_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter, its logical (TP=1) fp32 master weights and optimizer states (Adam:
    ``exp_avg``, ``exp_avg_sq``, ``step``) from the live engine, on CPU on every rank. Collective."""
    from pipeline.model.tp_state import gather_tp

    out = {}
    for name, p in engine.module.named_parameters():
        local = dsi.full_param_state(engine, p)
        out[name] = {k: v if v.dim() == 0 else gather_tp(v.to(p.device), p).cpu() for k, v in local.items()}
    return out


def _load_files(tag_dir: Path) -> tuple[list[dict], int]:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no mp_rank_*_model_states.pt files")
    models = [safe_torch_load(f, map_location="cpu") for f in files]
    for f, m in zip(files, models):
        if "tp_layout" not in m:
            raise CheckpointError(f"{f}: no 'tp_layout'; not written by sgtm train, cannot be resharded")
        if int(m.get("mp_world_size", len(files))) != len(files):
            raise CheckpointError(f"{tag_dir}: {len(files)} model-states files for TP={m.get('mp_world_size')}")
    return models, len(files)


def _zero0_param_states(tag_dir: Path, model: dict) -> dict[str, dict[str, torch.Tensor]]:
    """One TP rank's weights and per-parameter torch optimizer states of a ZeRO-0 checkpoint."""
    names = model.get("optimizer_params")
    opt = model.get("optimizer")
    if names is None or not isinstance(opt, dict) or "state" not in opt:
        raise CheckpointError(f"{tag_dir}: ZeRO-0 checkpoint without a plain optimizer state (bf16 ZeRO-0 "
                              "cannot be resharded; resume it on the layout it was written with)")
    out = {n: {"param": model["module"][n].float()} for group in names for n in group}
    for group, saved in zip(names, opt["param_groups"]):
        for name, index in zip(group, saved["params"]):
            for key, value in opt["state"].get(index, {}).items():
                out[name][key] = value.float().clone()
    return out


def consolidated_train_state(tag_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The consolidated form of a checkpoint, read from its files with no engine: per parameter
    its logical (TP=1) fp32 master and optimizer states (what :func:`full_train_state` reads from
    a live engine), and ``meta``: the client state, the LR scheduler's state and the engine's
    step counters. Every ZeRO stage; TP shards are merged with the saved ``tp_layout``."""
    from pipeline.model.tp_state import merge_tp_shards

    tag_dir = Path(tag_dir)
    models, tp = _load_files(tag_dir)
    first = models[0]
    zero = dsi.saved_zero_stage(first)
    per_rank = []
    for t, model in enumerate(models):
        if zero == 0:
            local = _zero0_param_states(tag_dir, model)
        else:
            files = dsi.zero_optimizer_files(tag_dir, t)
            if not files:
                raise CheckpointError(f"{tag_dir}: ZeRO-{zero} checkpoint without optimizer files for TP rank {t}")
            local = dsi.zero_param_states([safe_torch_load(f, map_location="cpu") for f in files])
            for name, states in local.items():
                shape = model["module"][name].shape
                for key, value in states.items():
                    if value.dim():
                        states[key] = value.view(shape)
        per_rank.append(local)
    layout = first["tp_layout"]
    params = {}
    for name, states in per_rank[0].items():
        if name in layout and tp > 1:
            params[name] = {k: v if v.dim() == 0 else merge_tp_shards([r[name][k] for r in per_rank], *layout[name])
                            for k, v in states.items()}
        else:
            params[name] = states
    meta = {"client": dsi.client_state_of(first), "lr_scheduler": first.get("lr_scheduler"),
            "counters": dsi.engine_counters(first), "zero_stage": zero, "tp": tp}
    return params, meta


def apply_train_state(engine, params: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Load a consolidated train state into an engine of any DP/TP size and ZeRO stage: every
    rank takes its TP slice of each logical tensor; ZeRO-1/2 write their DP partitions by the
    parameters' fragment addresses (``deepspeed_internals.set_full_param_state``); then the LR
    schedule (and the learning rate it set last) and the engine's step counters."""
    from megatron.core import parallel_state as ps

    from pipeline.model.tp_state import shard_full_tensor

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    named = dict(engine.module.named_parameters())
    if set(named) != set(params):
        missing, unexpected = sorted(set(named) - set(params)), sorted(set(params) - set(named))
        raise CheckpointError(f"checkpoint parameters do not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    local = {}
    for name, p in named.items():
        local[name] = {k: v if v.dim() == 0 else shard_full_tensor(v, p, tp_rank, tp).to(p.device)
                       for k, v in params[name].items()}
        if local[name]["param"].shape != p.shape:
            raise CheckpointError(f"{name}: shape {tuple(local[name]['param'].shape)} after resharding, "
                                  f"parameter is {tuple(p.shape)}")
    opt = engine.optimizer
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(local[name]["param"].to(p.dtype))
        if dsi.holds_gradient_partition(opt):
            keys = sorted({k for s in local.values() for k, v in s.items() if k != "param" and v.dim()})
            steps = {float(s["step"]) for s in local.values() if "step" in s}
            if len(steps) > 1:
                raise CheckpointError(f"checkpoint parameters disagree on the optimizer step {sorted(steps)}; "
                                      "a ZeRO-1/2 optimizer keeps one per group")
            if keys:
                dsi.init_zero_optimizer_state(opt, torch.tensor(steps.pop() if steps else 0.0), keys)
            for name, p in named.items():
                for key in ["param", *keys]:
                    if key in local[name]:  # a parameter a ZeRO-0 run never stepped keeps zeros
                        dsi.set_full_param_state(engine, p, key, local[name][key])
        else:
            plain = dsi.plain_optimizer(engine)
            if plain is None:
                raise CheckpointError(f"{type(opt).__name__}: this optimizer (bf16 ZeRO-0) cannot take a "
                                      "resharded state; resume on the layout the checkpoint was written with")
            for name, p in named.items():
                state = {k: v.clone() for k, v in local[name].items() if k != "param"}
                if state:
                    plain.state[p] = state
    scheduler = meta.get("lr_scheduler")
    if scheduler is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(scheduler)
        for group, lr in zip(opt.param_groups, scheduler.get("_last_lr", [])):
            group["lr"] = lr
    dsi.set_engine_counters(engine, meta["counters"])


def rank_states(root: Path, tag: str) -> list[dict]:
    """Every rank's file of a checkpoint (loader and RNG states), in rank order."""
    files = sorted((Path(root) / tag).glob("rank*.json"))
    if not files:
        raise CheckpointError(f"{Path(root) / tag}: no rank*.json files")
    return [json.loads(f.read_text()) for f in files]


def load_resharded(engine, root: Path, tag: str) -> tuple[dict, list[dict]]:
    """Restore a checkpoint written on another layout (DP and/or TP size, ZeRO stage) through
    its consolidated form; return (client_state, every old rank's state)."""
    root = Path(root)
    if not (root / tag / COMPLETE).is_file():
        raise CheckpointError(f"{root / tag}: no {COMPLETE} marker; refusing a partially written checkpoint")
    params, meta = consolidated_train_state(root / tag)
    apply_train_state(engine, params, meta)
    return meta["client"], rank_states(root, tag)


def restore(engine, root: Path, tag: str, layout: dict, loader) -> dict:
    """Resume model, optimizer, schedule, data loader and RNG from ``root/tag``; returns the
    client state. On the layout it was written with this is DeepSpeed's own load and the loader's
    exact state (the run continues bit for bit); on another layout (``COMPLETE`` says which) the
    model and optimizer are resharded (:func:`load_resharded`), the loader continues the global
    document order (``StreamingLoader.load_global_state``) and rank r takes old rank
    r mod old-world's RNG state; the client state then has ``resharded_from``."""
    saved = saved_layout(root, tag)
    if saved != layout and max((saved or {}).get("pp", 1), layout.get("pp", 1)) > 1:
        raise CheckpointError(f"{Path(root) / tag}: written on layout {saved}, this run is {layout}; a pipeline-"
                              f"parallel checkpoint resumes only on the layout it was written with")
    if saved != layout and max((saved or {}).get("ep", 1), layout.get("ep", 1)) > 1:
        raise CheckpointError(f"{Path(root) / tag}: written on layout {saved}, this run is {layout}; an expert-"
                              f"parallel checkpoint resumes only on the layout it was written with (its experts "
                              f"are not resharded)")
    if saved is None or saved == layout:
        client, rank_state = load(engine, root, tag)
        own = rank_state["loader"]
        if (own.get("dp_world_size"), own.get("num_workers")) == (loader.dp_world_size, loader.num_workers):
            loader.load_state_dict(own)
        else:  # same model layout, another worker count
            loader.load_global_state([s["loader"] for s in rank_states(root, tag)])
        set_rng_state(rank_state["rng"])
        return client
    client, states = load_resharded(engine, root, tag)
    loader.load_global_state([s["loader"] for s in states])
    set_rng_state(states[dist.get_rank() % len(states)]["rng"])
    return {**client, "resharded_from": saved}
