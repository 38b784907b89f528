"""Consolidate tensor-parallel shards into one logical state dict, and shard one back.

Megatron marks sharded parameters with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; with stride s a rank holds s sub-chunks (SwiGLU: [gate_r; up_r]), laid out
in the full tensor as chunk j of every rank before chunk j+1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


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
            t = merge_tp_shards(parts, p.partition_dim, getattr(p, "partition_stride", 1))
        out[name] = t.cpu().clone()
    return out


def merge_tp_shards(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The logical tensor from its TP shards (rank order): chunk j of every rank before chunk j+1."""
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
    return merge_tp_shards(parts, p.partition_dim, getattr(p, "partition_stride", 1))


def shard_full_tensor(full: torch.Tensor, p: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a logical tensor, for parameter ``p``."""
    if tp == 1 or not _is_sharded(p):
        return full
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
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
