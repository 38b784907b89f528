"""Consolidate tensor-parallel shards into one logical state dict, and shard one back.

Megatron marks sharded parameters with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; with stride s a rank holds s sub-chunks (SwiGLU: [gate_r; up_r]), laid out
in the full tensor as chunk j of every rank before chunk j+1.

Replicated KV heads (``model.n_kv_heads`` < TP, :class:`pipeline.model.transformer.Attention`):
the QKV weight and bias also carry ``tp_kv_replicas`` = c (TP ranks holding a copy of each KV
head) and ``tp_kv_tail`` (the K/V rows, the last rows of every rank's shard). The logical tensor
is the TP=1 KV-group-major one; group g's query rows are split over ranks g*c .. g*c+c-1, each of
which holds the whole K/V tail of g. Merging keeps one copy (the first rank's), sharding copies it
to each. A layout is ``[dim, stride]`` or ``[dim, stride, replicas, tail]`` (:func:`layout_of`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def layout_of(p: torch.Tensor) -> list[int]:
    """How ``p`` is sharded: [partition_dim, stride], plus [replicas, tail] for replicated K/V rows
    (saved in checkpoints as ``tp_layout`` so they consolidate without rebuilding the model)."""
    out = [int(p.partition_dim), int(getattr(p, "partition_stride", 1))]
    replicas = int(getattr(p, "tp_kv_replicas", 1))
    return out + [replicas, int(p.tp_kv_tail)] if replicas > 1 else out


def replica_copy_rows(p: torch.Tensor, tp_rank: int) -> torch.Tensor | None:
    """Bool [rows along the partition dim] marking the rows of ``p`` that are a replicated copy
    held by another TP rank too and not counted here (only the first rank of each replica set
    counts its K/V tail: gradient norms count every logical element once); None if there are none."""
    replicas = int(getattr(p, "tp_kv_replicas", 1))
    if replicas == 1 or tp_rank % replicas == 0:
        return None
    rows = torch.zeros(p.shape[p.partition_dim], dtype=torch.bool)
    rows[rows.numel() - int(p.tp_kv_tail):] = True
    return rows


def gather_full_state_dict(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """The TP=1 view of the model's parameters (or, with ``grads``, of their gradients), on CPU,
    on every TP rank."""
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach()
        if tp > 1 and _is_sharded(p):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = merge_tp_shards(parts, *layout_of(p))
        out[name] = t.cpu().clone()
    return out


def merge_tp_shards(parts: list[torch.Tensor], dim: int, stride: int = 1, replicas: int = 1,
                    tail: int = 0) -> torch.Tensor:
    """The logical tensor from its TP shards (rank order): chunk j of every rank before chunk j+1;
    with ``replicas`` > 1, per KV group the query rows of its ranks, then its K/V ``tail`` once."""
    if replicas > 1:
        out = []
        for g in range(0, len(parts), replicas):
            n = parts[g].shape[dim] - tail
            out += [parts[r].narrow(dim, 0, n) for r in range(g, g + replicas)] + [parts[g].narrow(dim, n, tail)]
        return torch.cat(out, dim=dim)
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def gather_tp(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The logical (TP=1) form of ``t``, a tensor laid out like parameter ``p`` on this TP rank
    (its weights, gradient or an optimizer state of it), on every TP rank. Collective over TP."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not _is_sharded(p):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return merge_tp_shards(parts, *layout_of(p))


def shard_full_tensor(full: torch.Tensor, p: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a logical tensor, for parameter ``p``."""
    if tp == 1 or not _is_sharded(p):
        return full
    return shard_logical(full, tp_rank, tp, *layout_of(p))


def shard_logical(full: torch.Tensor, tp_rank: int, tp: int, dim: int, stride: int = 1, replicas: int = 1,
                  tail: int = 0) -> torch.Tensor:
    """This rank's slice of a logical tensor with the given layout (the inverse of
    :func:`merge_tp_shards`)."""
    if replicas > 1:  # this rank's part of its group's query rows, and the group's whole K/V tail
        block = full.chunk(tp // replicas, dim=dim)[tp_rank // replicas]
        n = (block.shape[dim] - tail) // replicas
        j = tp_rank % replicas
        return torch.cat([block.narrow(dim, j * n, n), block.narrow(dim, block.shape[dim] - tail, tail)], dim=dim)
    chunks = full.chunk(tp * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp], dim=dim)


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a TP=1 state dict into this rank's shards; names and shapes must match exactly."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            local = shard_full_tensor(state[name], p, rank, tp)
            if local.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(local.shape)} after sharding, parameter is {tuple(p.shape)}")
            p.copy_(local.to(p.dtype))


@torch.no_grad()
def sync_kv_replicas(p: torch.Tensor) -> None:
    """Make every copy of a replicated K/V head equal to the first rank's (after an edit made per
    rank, e.g. a random re-initialisation). Collective over TP; a no-op for other parameters."""
    replicas = int(getattr(p, "tp_kv_replicas", 1))
    if replicas == 1:
        return
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    tail = int(p.tp_kv_tail)
    buf = p.new_zeros((tp // replicas, tail) + tuple(p.shape[1:]))
    if rank % replicas == 0:
        buf[rank // replicas] = p[-tail:]
    dist.all_reduce(buf, group=ps.get_tensor_model_parallel_group())
    p[-tail:] = buf[rank // replicas]
