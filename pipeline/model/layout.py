"""Where the model's parameters sit across pipeline stages, and what they are called.

The model owns its layout: which blocks each pipeline stage holds (:func:`stage_blocks`), what
else the first and last stages hold, and the one rule that maps a pipeline layer's parameter name
to the :class:`pipeline.model.transformer.Transformer`'s (:func:`canonical_name`), by which
checkpoints of the two layouts are compared and merged. Pure functions of the shapes (no torch, no
process groups): the engine, the pipeline stages, offline consolidation and ``sgtm partition``
read them.
"""

from __future__ import annotations

STAGE_EXTRAS = {"first": "embeddings", "last": "final norm + LM head + loss"}


def stage_blocks(n_layers: int, pp: int) -> list[range]:
    """The blocks each pipeline stage holds (``engine.pipeline_parallel`` divides ``n_layers``)."""
    per = n_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


def stage_layout(partition, pp: int) -> list[dict]:
    """Per stage: its blocks, what else it holds, and per TP rank the forget heads (KV groups) and
    MLP units it owns in those blocks ({domain: {block: {'heads', 'units'}}}); ``sgtm partition``."""
    out = []
    for s, blocks in enumerate(stage_blocks(partition.model.n_layers, pp)):
        extras = [STAGE_EXTRAS[k] for k, hit in (("first", s == 0), ("last", s == pp - 1)) if hit]
        owned = {r: {name: {b: v for b, v in layers.items() if b in blocks}
                     for name, layers in partition.owned(r).items()} for r in range(partition.tp_size)}
        out.append({"stage": s, "blocks": list(blocks), "also": extras, "owned": owned})
    return out


def canonical_name(layer: int, name: str, n_layers: int) -> str:
    """The Transformer's name of parameter ``name`` of pipeline layer ``layer`` (0: embeddings,
    1..n: block layer - 1, n + 1: final norm and head), e.g. (2, 'block.attn.qkv.weight') ->
    'blocks.1.attn.qkv.weight'; what checkpoints of the two layouts are compared and merged by."""
    if 1 <= layer <= n_layers:
        return f"blocks.{layer - 1}.{name.removeprefix('block.')}"
    return name
