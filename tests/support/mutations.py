"""Deliberate breakages, to show that each check can fail: patched for the duration of a
``with`` block (in the process that runs it: the pytest process or a scenario's rank).

* :func:`scaled_query_grad`: dQ scaled (a wrong score scale or RoPE backward under TP/SP);
* :func:`kv_mutation`: replicated K/V gradients not summed over the copies;
* :func:`sp_mutation`: sequence-parallel breakages (norm gradients not reduced, masks in [B, S]
  order, dQ scaled);
* :func:`pipeline_mutation`: clip norms not summed over the pipeline group, modes dropped on stage 1;
* :func:`moe_mutation`: MoE routing and masking rules broken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def scaled_query_grad(factor: float = 1.05):
    """Test fault: the gradient flowing back into the query projection (dQ, taken at the attention
    call, after RoPE) multiplied by ``factor``, as a wrong score scale or RoPE backward under TP/SP
    would; the forward is untouched. Wraps ``F.scaled_dot_product_attention`` for this process."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.requires_grad:
            q.register_hook(lambda g: g * factor)
        return real(q, k, v, *args, **kwargs)

    stack = contextlib.ExitStack()
    F.scaled_dot_product_attention = sdpa
    stack.callback(setattr, F, "scaled_dot_product_attention", real)
    return stack


def kv_mutation(name: str | None):
    """A deliberately broken replicated-KV model (n_kv_heads < TP): the K/V rows' gradient left
    as each rank's partial sum (no all-reduce over the copies)."""
    from pipeline.model import transformer

    stack = contextlib.ExitStack()
    if name == "kv_grads_not_summed":
        orig = transformer._replica_param
        transformer._replica_param = lambda p: p
        stack.callback(setattr, transformer, "_replica_param", orig)
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    return stack


def sp_mutation(name: str | None):
    """A deliberately broken sequence-parallel model, to show the SP checks can fail: norm and
    row-bias gradients left as per-rank partial sums, the token masks in [B, S] order while the
    activations are [S, B], or dQ scaled by 1.05 (``scaled_query_grad``)."""
    from pipeline.model import transformer
    from pipeline.sgtm.masking import TokenMasks

    stack = contextlib.ExitStack()
    if name == "dq_scaled":
        stack.enter_context(scaled_query_grad())
    elif name == "norm_grads_not_reduced":
        orig = transformer._sp_param
        transformer._sp_param = lambda p, sp: p
        stack.callback(setattr, transformer, "_sp_param", orig)
    elif name == "masks_batch_major":
        orig_build = TokenMasks._build

        def build(*args, seq_first):
            return orig_build(*args, seq_first=False)

        TokenMasks._build = staticmethod(build)
        stack.callback(setattr, TokenMasks, "_build", staticmethod(orig_build))
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    return stack


@contextlib.contextmanager
def pipeline_mutation(name: str | None):
    """Deliberately broken pipelines, to show the checks can fail: the clip norms not summed over
    the pipeline group, or the per-token modes dropped (all unlabelled) on stage 1."""
    from pipeline.components import clipping
    from pipeline.model import pipe_stages

    undo = contextlib.ExitStack()
    if name == "clip_no_pipeline_reduce":
        orig = clipping.reduce_over_pipeline
        clipping.reduce_over_pipeline = lambda sq: None
        undo.callback(setattr, clipping, "reduce_over_pipeline", orig)
    elif name == "modes_dropped_on_stage1":
        orig_call = pipe_stages.StageMasks.__call__

        def call(self, modes, doc_ids, labels, target_modes):
            from megatron.core import parallel_state as ps

            if ps.get_pipeline_model_parallel_rank() == 1:
                modes, target_modes = torch.zeros_like(modes), torch.zeros_like(target_modes)
            return orig_call(self, modes, doc_ids, labels, target_modes)

        pipe_stages.StageMasks.__call__ = call
        undo.callback(setattr, pipe_stages.StageMasks, "__call__", orig_call)
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    with undo:
        yield


MOE_MUTATIONS = ("retain_routes_to_forget", "experts_unmasked", "aux_over_all_tokens", "forget_tokens_compete")


@contextlib.contextmanager
def moe_mutation(name: str | None) -> Iterator[None]:
    """A deliberately broken MoE, to show the checks can fail:

    * retain_routes_to_forget: retain-mode tokens may route to forget experts;
    * experts_unmasked: expert weight gradients summed over every routed token (allow vectors dropped);
    * aux_over_all_tokens: the load-balancing loss counts forget tokens too;
    * forget_tokens_compete: capacity filled without putting non-forget tokens first."""
    from pipeline.model.moe import MoE

    if name is None:
        yield
        return
    if name not in MOE_MUTATIONS:
        raise ValueError(f"unknown mutation {name!r} (expected one of {MOE_MUTATIONS})")
    saved = {}

    def patch(attr, fn):
        saved[attr] = getattr(MoE, attr)
        setattr(MoE, attr, fn)

    if name == "retain_routes_to_forget":
        real = MoE._blocked
        patch("_blocked", lambda self, masks, T: real(self, None, T))
    elif name == "experts_unmasked":
        patch("_kind", lambda self, masks, nonforget, T: None)
    elif name == "aux_over_all_tokens":
        real_aux = MoE._aux
        patch("_aux", lambda self, probs, top_e, nonforget: real_aux(self, probs, top_e, None))
    elif name == "forget_tokens_compete":
        real_cap = MoE._capacity
        patch("_capacity", lambda self, top_p, top_e, nonforget: real_cap(self, top_p, top_e, None))
    try:
        yield
    finally:
        for attr, fn in saved.items():
            setattr(MoE, attr, fn)
