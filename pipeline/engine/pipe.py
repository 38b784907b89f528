"""Pipeline parallelism inside DeepSpeed (``engine.pipeline_parallel > 1``): the engine, one
train step, evaluation and gathering for a model split into stages.

Topology pipe x data x model: megatron's ``parallel_state`` (order tp-cp-ep-dp-pp: TP fastest,
PP slowest) and DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model) number the
ranks the same way, which :func:`build_pipeline_engine` checks on every rank; megatron's TP groups
run the TP layers inside each stage, DeepSpeed's grid (same members) reduces gradients over DP and
passes activations between stages. The stages are :mod:`pipeline.model.pipe_stages`.

A step is ``engine.train_batch``: DeepSpeed's 1F1B schedule over ``grad_accum_steps``
micro-batches. Per-partition clipping runs where it does at PP=1 (ZeRO-1: inside the optimizer
step; ZeRO-0: before it, :func:`deepspeed_internals.wrap_pipe_optimizer_step`), its norms summed
over the TP x DP ranks of a stage and then over the pipeline group
(:meth:`PartitionClipper._all_reduce_norms`); the non-finite check of a step is agreed by every
rank of every stage before the update, as at PP=1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.engine import deepspeed_internals as dsi

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


def check_topology(topology) -> None:
    """DeepSpeed's grid coordinates of this rank must be megatron's (pipe, data, tensor) ranks."""
    from megatron.core import parallel_state as ps

    coord = topology.get_coord(dist.get_rank())
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != mine:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed's pipe/data/model coordinates {tuple(coord)} differ "
                           f"from megatron's {mine}; the rank orders disagree")


def build_pipeline_engine(cfg, dist_info, partition, model):
    """The ``TrainState`` of a pipeline-parallel run: ``model`` (the whole Transformer, built as at
    PP=1 so every stage's weights equal PP=1's) is split into a :class:`SGTMPipelineModule` that
    keeps this stage's layers only."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from pipeline.engine.engine import TrainState, deepspeed_config, lr_factor, param_groups, partition_groups
    from pipeline.model.pipe_stages import PipeLoss, SGTMPipelineModule

    e = cfg.engine
    topology = PipeModelDataParallelTopology(num_pp=dist_info.pp_size, num_mp=dist_info.tp_size,
                                             num_dp=dist_info.dp_size)
    check_topology(topology)
    loss_fn = PipeLoss(model.sequence_parallel)
    module = SGTMPipelineModule(model, topology, loss_fn)
    expect = stage_blocks(cfg.model.n_layers, dist_info.pp_size)[dist_info.pp_rank]
    first, last = dist_info.pp_rank == 0, dist_info.pp_rank == dist_info.pp_size - 1
    want = range(expect.start + (0 if first else 1), expect.stop + 1 + (1 if last else 0))
    if module.stage_layers != want:
        raise RuntimeError(f"pipeline stage {dist_info.pp_rank}: DeepSpeed placed layers {module.stage_layers}, "
                           f"expected {want} (blocks {expect})")
    dsi.release_remote_layers(module)  # the caller drops ``model``: other stages' layers are freed
    ds_config = deepspeed_config(cfg, dist_info)
    # Megatron's TP layers keep activations sharded (SP) or replicated across TP; DeepSpeed's
    # partitioned sends assume replicated ones, so activations travel whole per TP rank.
    ds_config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    per_partition = e.grad_clip > 0 and e.clip_mode == "per_partition"
    if per_partition:
        dsi.check_clip_config(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, cfg.optimizer.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)))
    clipper, groups = partition_groups(cfg, module, partition, engine, dist_info)
    state = TrainState(cfg, dist_info, partition, module, engine, clipper, grad_groups=groups)
    dsi.wrap_pipe_optimizer_step(engine, lambda eng: _before_update(state, eng))
    return state


def _before_update(state, engine) -> bool:
    """Inside the pipeline engine's step, after the gradient reduction: agree with every rank of
    every stage whether the step is finite (the update is skipped on all or none); ZeRO-0 clips
    ``param.grad`` here. Returns whether to apply the update."""
    from pipeline.engine.engine import decide_update

    decide_update(state, dsi.pipe_losses_finite(engine).to(state.dist.device))
    if state.last_step_finite and state.clipper is not None and not state.clipper.uses_zero_partition:
        state.clipper.clip_param_grads()
    return state.last_step_finite


def train_step(state, micro_batches: list[dict], step: int | None = None) -> torch.Tensor:
    """One optimizer step over ``grad_accum_steps`` micro-batches through the pipeline; returns
    the mean loss over micro-batches and DP ranks (on every stage), as the PP=1 step does. A
    non-finite loss or gradient on any rank of any stage skips the update on all of them
    (``state.last_step_finite``). ``step`` (1-based) arms the ``nan_loss`` test fault."""
    from pipeline.components import faults
    from pipeline.engine.engine import ClipperNotRunError
    from pipeline.model.pipe_stages import pipe_inputs

    if len(micro_batches) != state.cfg.engine.grad_accum_steps:
        raise ValueError(f"expected {state.cfg.engine.grad_accum_steps} micro-batches, got {len(micro_batches)}")
    clips_before = state.clipper.runs if state.clipper is not None else 0
    loss_fn = state.model.loss_fn
    loss_fn.per_token, loss_fn.poison = False, faults.armed("nan_loss", step)
    try:
        loss = state.engine.train_batch(data_iter=iter([pipe_inputs(mb, state.dist.device) for mb in micro_batches]))
    finally:
        loss_fn.poison = False
    if state.last_step_finite and state.clipper is not None and state.clipper.runs != clips_before + 1:
        raise ClipperNotRunError(
            f"step {step}: engine.clip_mode=per_partition, but the clipper ran {state.clipper.runs - clips_before} "
            f"times in this pipeline step instead of once; the update may be unclipped, stopping")
    return loss.detach().float()


@torch.no_grad()
def per_token_losses(state, batches: list[dict], ablated_domains: list[int] | None) -> list[torch.Tensor]:
    """Per-token losses [B, S] of every batch (0 where unlabelled) through the pipeline, on every
    rank (the last stage computes them, then broadcasts them over the pipeline group); ablated
    domains switched off in every stage's blocks. Collective over the whole world."""
    from megatron.core import parallel_state as ps

    from pipeline.model.pipe_stages import pipe_inputs

    engine, module = state.engine, state.model
    if not batches:
        return []
    module.set_ablated(ablated_domains or [])
    # As at PP=1 (pipeline.components.evaluation): token ids, labels and documents only, no modes.
    batches = [{k: b[k] for k in ("input_ids", "labels", "doc_ids") if k in b} for b in batches]
    loss_fn = state.model.loss_fn
    loss_fn.per_token, loss_fn.collected = True, []
    engine.reset_activation_shape()  # evaluation batches need not have the training shape
    try:
        engine.eval_batch(iter([pipe_inputs(b, state.dist.device) for b in batches]), compute_loss=True,
                          reduce_output=None, bcast_loss=False, num_micro_batches=len(batches))
        outs = loss_fn.collected
    finally:
        engine.reset_activation_shape()
        loss_fn.per_token, loss_fn.collected = False, []
        module.set_ablated([])
    result = []
    for i, b in enumerate(batches):
        t = outs[i].float() if engine.is_last_stage() else torch.empty(b["input_ids"].shape, device=state.dist.device)
        if state.dist.pp_size > 1:
            dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        result.append(t)
    return result


@torch.no_grad()
def evaluate(state, eval_sets: dict[str, list[dict]], ablated_domains: list[int], report=None) -> dict:
    """Held-out loss per set, full and ablated, as :func:`pipeline.components.evaluation.evaluate`
    computes it at PP=1 (no calibration at PP > 1: the config refuses it)."""
    from pipeline.components.evaluation import SetResult
    from pipeline.model.transformer import IGNORE_INDEX

    results = {}
    for name, batches in eval_sets.items():
        if not batches:
            continue
        full = per_token_losses(state, batches, None)
        abl = per_token_losses(state, batches, ablated_domains)
        per = {"full": [], "ablated": []}
        for b, lf, la in zip(batches, full, abl):
            valid = (b["labels"] != IGNORE_INDEX).to(lf.device)
            per["full"].append(lf[valid])
            per["ablated"].append(la[valid])
        cat = {k: torch.cat(v).cpu() for k, v in per.items()}
        results[name] = SetResult(full=float(cat["full"].mean()), ablated=float(cat["ablated"].mean()),
                                  calibrated=None, tokens=int(cat["full"].numel()), per_token=cat)
        if report:
            r = results[name]
            report(f"{name}: {len(batches)} batches, {r.tokens:,} tokens: full {r.full:.4f} ablated {r.ablated:.4f}")
    return results


def gather_pipeline_state_dict(module, grads: bool = False) -> dict[str, torch.Tensor]:
    """The TP=1, PP=1 view of a pipeline module's parameters (or gradients), under the
    Transformer's names, on CPU on every rank. Collective over the world."""
    from megatron.core import parallel_state as ps

    from pipeline.model.tp_state import gather_full_state_dict

    local = {module.canonical_names[n]: t for n, t in gather_full_state_dict(module, grads=grads).items()}
    parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    return out
