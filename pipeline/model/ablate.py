"""Ablation: remove the forget domains' parameters after training, on every TP shard (it acts on
the model, so it lives beside it; the forget partition it reads is :mod:`pipeline.sgtm.partition`)."""

from __future__ import annotations

import torch

from pipeline.model.tp_state import sync_kv_replicas
from pipeline.model.transformer import Transformer


def forget_slice_mask(param: torch.nn.Parameter, domains: list[int]) -> torch.Tensor | None:
    """Bool mask (broadcastable) of the slices of ``param`` that belong to ``domains``."""
    role = getattr(param, "sgtm_role", None)
    if role is None:
        raise ValueError("parameter has no sgtm_role: every parameter must be classified by the partition")
    if not set(role.forget_domains) & set(domains):
        return None
    return role.slice_mask(param, set(domains))


@torch.no_grad()
def ablate(model: Transformer, domains: list[int] | None = None, how: str = "zero",
           generator: torch.Generator | None = None) -> Transformer:
    """Zero (or re-initialise) the forget parameters of ``domains`` (default: all) in place.

    ``zero`` also switches those heads/units off in the forward pass, so the returned model no
    longer depends on them at all. ``reinit`` draws fresh N(0, init_std) weights (biases zero),
    e.g. to start a fine-tuning attack from capacity that holds no forget knowledge."""
    domains = list(range(len(model.partition.domains))) if domains is None else list(domains)
    if how not in ("zero", "reinit"):
        raise ValueError(f"how: expected 'zero' or 'reinit', got {how!r}")
    for p in model.parameters():
        mask = forget_slice_mask(p, domains)
        if mask is None:
            continue
        if how == "reinit" and p.dim() >= 2:
            fresh = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * model.cfg.init_std
            p.copy_(torch.where(mask, fresh, p))
        else:
            p.masked_fill_(mask, 0.0)
    if how == "reinit":  # copies of a replicated KV head stay equal (collective: every rank, every copy)
        for p in model.parameters():
            sync_kv_replicas(p)
    if how == "zero":
        model.set_ablated(domains)
    return model
