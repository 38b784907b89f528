"""`sgtm partition`: show what a config's forget partition reserves, per block and per TP rank."""

from __future__ import annotations

import argparse
import json

from pipeline.config import load_config, to_dict
from pipeline.sgtm.partition import ForgetPartition


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("partition", help="print the forget partition of a config (no training)")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    part = ForgetPartition(cfg.model, cfg.sgtm, cfg.engine.tensor_parallel)
    pp = cfg.engine.pipeline_parallel
    if args.json:
        extra = {}
        if cfg.model.n_experts:  # which routed experts each domain owns on which EP rank
            from pipeline.model.moe import expert_ownership

            extra["experts_by_ep_rank"] = expert_ownership(part, cfg.engine.expert_parallel)
        if pp > 1:
            from pipeline.model.layout import stage_layout

            extra["stages"] = stage_layout(part, pp)
        print(json.dumps({"partition": part.to_dict(), "model": to_dict(cfg.model),
                          "owned": {r: part.owned(r) for r in range(part.tp_size)}, **extra}))
        return 0
    from pipeline.model.shapes import num_params

    m = cfg.model
    print(f"model: {m.arch} ({m.norm}, {m.positions} positions, {m.mlp}), {m.n_layers} blocks, d={m.d_model}, "
          f"{m.n_heads} heads / {m.n_kv_heads} KV heads, d_ff={m.d_ff}, "
          f"{num_params(m) / 1e6:.2f}M params; TP={part.tp_size}")
    print(part.summary())
    per_head = (2 + 2 / m.query_heads_per_kv_head) * m.d_model * m.head_dim  # Q rows, W_O columns, its share of K/V
    per_unit = (3 if m.mlp == "swiglu" else 2) * m.d_model
    per_expert = (3 if m.mlp == "swiglu" else 2) * m.d_model * m.d_ff  # a whole routed expert (MoE)
    n_forget = int(sum(len(part.heads(b, d)) * per_head + len(part.units(b, d)) * per_unit
                       + len(part.experts(b, d)) * per_expert
                       for d in range(len(part.domains)) for b in range(m.n_layers)))
    print(f"forget parameters: {n_forget / 1e6:.3f}M ({100 * n_forget / num_params(m):.2f}% of the model)")
    per_group = m.query_heads_per_kv_head
    for r in range(part.tp_size):
        owned = part.owned(r)
        h0, c = r * part.heads_per_rank, part.kv_replicas
        if c > 1:  # n_kv_heads < TP: this rank holds a copy of one KV head, shared with c - 1 ranks
            kv = f"a copy of KV group {r // c} (replicated on TP ranks {r // c * c}-{r // c * c + c - 1})"
        else:
            g0 = r * part.kv_heads_per_rank
            kv = f"KV groups {g0}-{g0 + part.kv_heads_per_rank - 1}"
        where = (f"TP rank {r} (query heads {h0}-{h0 + part.heads_per_rank - 1}, {kv}, units "
                 f"{r * part.units_per_rank}-{(r + 1) * part.units_per_rank - 1})")
        parts = []
        for name, layers in owned.items():
            heads = sorted({h for v in layers.values() for h in v["heads"]})
            groups = sorted({h // per_group for h in heads})
            nu = sum(len(v["units"]) for v in layers.values())
            what = f"KV groups {groups} (query heads {heads})" if per_group > 1 else f"heads {heads}"
            parts.append(f"{name}: {what if heads else 'no heads'}, {nu} (unit, block) pairs in {len(layers)} blocks")
        print(f"{where}: " + ("; ".join(parts) if parts else "no forget parameters"))
    if pp > 1:
        _print_stages(part, pp)
    if m.n_experts:
        from pipeline.model.moe import describe

        print(describe(part, cfg.engine.expert_parallel))
    return 0


def _print_stages(part: ForgetPartition, pp: int) -> None:
    """Which pipeline stage (and TP rank in it) owns which forget heads/KV groups and units."""
    from pipeline.model.layout import stage_layout

    per_group = part.model.query_heads_per_kv_head
    print(f"pipeline: {pp} stages (engine.pipeline_parallel), {part.model.n_layers // pp} blocks each")
    for st in stage_layout(part, pp):
        b = st["blocks"]
        where = f"stage {st['stage']} (blocks {b[0]}-{b[-1]}{''.join(', ' + x for x in st['also'])})"
        for r, owned in st["owned"].items():
            parts = []
            for name, layers in owned.items():
                if not layers:
                    continue
                heads = sorted({h for v in layers.values() for h in v["heads"]})
                head_blocks = sorted(k for k, v in layers.items() if v["heads"])
                groups = sorted({h // per_group for h in heads})
                what = f"KV groups {groups} (query heads {heads})" if per_group > 1 else f"heads {heads}"
                nu = sum(len(v["units"]) for v in layers.values())
                parts.append(f"{name}: {f'{what} in blocks {head_blocks}' if heads else 'no heads'}, "
                             f"{nu} (unit, block) pairs")
            print(f"{where} TP rank {r}: " + ("; ".join(parts) if parts else "no forget parameters"))
