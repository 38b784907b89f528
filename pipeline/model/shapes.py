"""The model's parameters, counted from its shapes without building it: the one place that
knows how many elements each tensor of :mod:`pipeline.model.transformer` (and
:mod:`pipeline.model.moe`) has.

:func:`model_shapes` lists every parameter under the Transformer's own name (a block's as
``blocks.{i}.``), with its element count, whether it is split over the TP ranks and which pipeline
stage holds it; ``tests/test_architectures.py`` and ``tests/test_moe.py`` compare it with the
built model's ``named_parameters``. What the rest of the pipeline counts comes from it:
:func:`num_params` (the size names in configs/models, the checkpoint preflight, ``sgtm
partition``, the analyses), :func:`expert_params`/:func:`active_params` (MoE reporting) and
:func:`per_rank` (``tools/memory_estimate.py``: what one rank holds at a TP size).

Imports only the config, so a tool that reads shapes need not import torch or megatron.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ModelConfig


@dataclass(frozen=True)
class ParamShape:
    name: str  # the Transformer's parameter name
    numel: int  # elements over all TP ranks (a KV head replicated over TP ranks once per copy)
    sharded: bool  # split over the TP ranks (else each TP rank holds it whole)
    stage: str  # the pipeline stage that holds it: "first" (embeddings), "block", "last" (final norm, LM head)


def _norm(m: ModelConfig, name: str, stage: str) -> list[ParamShape]:
    d = m.d_model
    return [ParamShape(f"{name}.weight", d, False, stage)] + (
        [] if m.norm == "rmsnorm" else [ParamShape(f"{name}.bias", d, False, stage)])


def _linear(name: str, rows: int, cols: int, bias: bool, sharded: bool, bias_sharded: bool | None = None,
            stage: str = "block") -> list[ParamShape]:
    """A [rows, cols] weight and its [rows] bias (a row-parallel layer's bias is replicated)."""
    out = [ParamShape(f"{name}.weight", rows * cols, sharded, stage)]
    if bias:
        out.append(ParamShape(f"{name}.bias", rows, sharded if bias_sharded is None else bias_sharded, stage))
    return out


def _mlp(m: ModelConfig, name: str, d_ff: int) -> list[ParamShape]:
    """The dense MLP at width ``d_ff``: fc1 (SwiGLU: [gate; up] rows) column-parallel, fc2 row-parallel."""
    d, b = m.d_model, bool(m.bias)
    rows = 2 * d_ff if m.mlp == "swiglu" else d_ff
    return _linear(f"{name}.fc1", rows, d, b, True) + _linear(f"{name}.fc2", d, d_ff, b, True, bias_sharded=False)


def _experts(m: ModelConfig, name: str) -> list[ParamShape]:
    """The router and the routed experts (split over EP ranks, whole on each TP rank), then the
    shared experts' MLP (``moe_shared_experts * d_ff`` units, TP-split as the dense MLP)."""
    out = [ParamShape(f"{name}.router", m.n_experts * m.d_model, False, "block")]
    for e in range(m.n_experts):
        out += expert_shapes(m, f"{name}.experts.{e}")
    if m.moe_shared_experts:
        out += _mlp(m, f"{name}.shared", m.moe_shared_experts * m.d_ff)
    return out


def expert_shapes(m: ModelConfig, name: str = "expert") -> list[ParamShape]:
    """One routed expert: the dense MLP's shape at width ``d_ff`` (SwiGLU rows [gate; up])."""
    d, f, b = m.d_model, m.d_ff, bool(m.bias)
    rows = 2 * f if m.mlp == "swiglu" else f
    out = [ParamShape(f"{name}.w_in", rows * d, False, "block"), ParamShape(f"{name}.w_out", d * f, False, "block")]
    if b:
        out += [ParamShape(f"{name}.b_in", rows, False, "block"), ParamShape(f"{name}.b_out", d, False, "block")]
    return out


def block_shapes(m: ModelConfig, tp: int = 1, layer: int = 0) -> list[ParamShape]:
    """The parameters of block ``layer`` at TP size ``tp``. Rows of the fused QKV projection are
    the queries plus the K/V rows of every KV head; with n_kv_heads < TP a KV head is replicated on
    ``tp // n_kv_heads`` ranks, each holding a whole copy (counted once per copy)."""
    d, b, hd = m.d_model, bool(m.bias), m.head_dim
    p = f"blocks.{layer}"
    kv_rows = 2 * hd * max(1, m.n_kv_heads // tp) * tp
    out = _norm(m, f"{p}.norm1", "block")
    out += _linear(f"{p}.attn.qkv", d + kv_rows, d, b, True)
    out += _linear(f"{p}.attn.out", d, d, b, True, bias_sharded=False)
    out += _norm(m, f"{p}.norm2", "block")
    out += _experts(m, f"{p}.mlp") if m.n_experts else _mlp(m, f"{p}.mlp", m.d_ff)
    return out


def model_shapes(m: ModelConfig, tp: int = 1, padded: bool = False) -> list[ParamShape]:
    """Every parameter of the model, in the Transformer's order; ``padded``: the vocabulary as
    built (``padded_vocab_size``), else as the config names it (``vocab_size``)."""
    d = m.d_model
    v = m.padded_vocab_size if padded else m.vocab_size
    out = [ParamShape("embedding.weight", v * d, True, "first")]
    if m.positions == "learned":
        out.append(ParamShape("position_embedding.weight", m.max_seq_len * d, False, "first"))
    for layer in range(m.n_layers):
        out += block_shapes(m, tp, layer)
    out += _norm(m, "final_norm", "last")
    if not m.tie_embeddings:
        out.append(ParamShape("lm_head.weight", v * d, True, "last"))
    return out


def per_rank(shapes: list[ParamShape], tp: int) -> tuple[int, int]:
    """(TP-sharded elements one rank holds, replicated elements) of ``shapes`` at TP size ``tp``."""
    return (sum(s.numel for s in shapes if s.sharded) // tp, sum(s.numel for s in shapes if not s.sharded))


def num_params(m: ModelConfig) -> int:
    """Parameters of the unpadded model (what the size names in configs/models count); an MoE
    model's every expert (total, not active), router and shared experts' MLP."""
    return sum(s.numel for s in model_shapes(m))


def expert_params(m: ModelConfig) -> int:
    """Parameters of one routed expert (an MLP of width ``d_ff``)."""
    return sum(s.numel for s in expert_shapes(m))


def active_params(m: ModelConfig) -> int:
    """Parameters a token uses: the total less, per block, the routed experts it is not sent to
    (``n_experts - moe_top_k``); the whole model for a dense one."""
    if not m.n_experts:
        return num_params(m)
    return num_params(m) - m.n_layers * (m.n_experts - m.moe_top_k) * expert_params(m)
