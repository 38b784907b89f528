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
            dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
            chunks = [part.chunk(stride, dim=dim) for part in parts]
            t = torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)
        out[name] = t.cpu().clone()
    return out


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
