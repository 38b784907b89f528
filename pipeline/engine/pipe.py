"""The trainer of a model split into pipeline stages (``engine.pipeline_parallel > 1``), inside
DeepSpeed's pipeline engine: construction, one train step, evaluation and gathering.

Topology pipe x data x model: megatron's ``parallel_state`` (order tp-cp-ep-dp-pp: TP fastest,
PP slowest) and DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model) number the
ranks the same way, which :meth:`PipelineTrainer.wrap` checks on every rank; megatron's TP groups
run the TP layers inside each stage, DeepSpeed's grid (same members) reduces gradients over DP and
passes activations between stages. The stages are :mod:`pipeline.model.pipe_stages`, which blocks
each holds :func:`pipeline.model.layout.stage_blocks`.

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

from pipeline.backend import deepspeed_internals as dsi
from pipeline.components import faults
from pipeline.components.evaluation import SetResult
from pipeline.engine.trainer import ClipperNotRunError, Trainer, decide_update
from pipeline.model.layout import stage_blocks
from pipeline.model.pipe_stages import PipeLoss, SGTMPipelineModule, pipe_inputs
from pipeline.model.tp_state import gather_full_state_dict
from pipeline.model.transformer import IGNORE_INDEX


def check_topology(topology) -> None:
    """DeepSpeed's grid coordinates of this rank must be megatron's (pipe, data, tensor) ranks."""
    from megatron.core import parallel_state as ps

    coord = topology.get_coord(dist.get_rank())
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != mine:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed's pipe/data/model coordinates {tuple(coord)} differ "
                           f"from megatron's {mine}; the rank orders disagree")


class PipelineTrainer(Trainer):
    """This stage's layers in DeepSpeed's ``PipelineEngine`` (``engine.pipeline_parallel > 1``)."""

    @staticmethod
    def kept_blocks(cfg, dist_info) -> range:
        return stage_blocks(cfg.model.n_layers, dist_info.pp_size)[dist_info.pp_rank]

    @staticmethod
    def wrap(cfg, dist_info, model) -> SGTMPipelineModule:
        """``model`` (the whole Transformer, built as at PP=1 so every stage's weights equal PP=1's)
        split into a :class:`SGTMPipelineModule` that keeps this stage's layers only."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        topology = PipeModelDataParallelTopology(num_pp=dist_info.pp_size, num_mp=dist_info.tp_size,
                                                 num_dp=dist_info.dp_size)
        check_topology(topology)
        module = SGTMPipelineModule(model, topology, PipeLoss(model.sequence_parallel))
        expect = stage_blocks(cfg.model.n_layers, dist_info.pp_size)[dist_info.pp_rank]
        first, last = dist_info.pp_rank == 0, dist_info.pp_rank == dist_info.pp_size - 1
        want = range(expect.start + (0 if first else 1), expect.stop + 1 + (1 if last else 0))
        if module.stage_layers != want:
            raise RuntimeError(f"pipeline stage {dist_info.pp_rank}: DeepSpeed placed layers {module.stage_layers}, "
                               f"expected {want} (blocks {expect})")
        dsi.release_remote_layers(module)  # the caller drops ``model``: other stages' layers are freed
        return module

    @staticmethod
    def configure(ds_config: dict) -> dict:
        # Megatron's TP layers keep activations sharded (SP) or replicated across TP; DeepSpeed's
        # partitioned sends assume replicated ones, so activations travel whole per TP rank.
        ds_config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        return ds_config

    def attach(self) -> None:
        dsi.wrap_pipe_optimizer_step(self.engine, lambda eng: self._before_update(eng))

    def _before_update(self, engine) -> bool:
        """Inside the pipeline engine's step, after the gradient reduction: agree with every rank of
        every stage whether the step is finite (the update is skipped on all or none); ZeRO-0 clips
        ``param.grad`` here. Returns whether to apply the update."""
        decide_update(self, dsi.pipe_losses_finite(engine).to(self.dist.device))
        if self.last_step_finite and self.clipper is not None and not self.clipper.uses_zero_partition:
            self.clipper.clip_param_grads()
        return self.last_step_finite

    def train_step(self, micro_batches: list[dict], step: int | None = None) -> torch.Tensor:
        """Through the pipeline; returns the mean loss over micro-batches and DP ranks (on every
        stage), as the flat step does. A non-finite loss or gradient on any rank of any stage skips
        the update on all of them. ``step`` (1-based) arms the ``nan_loss`` test fault."""
        self.check_micro_batches(micro_batches)
        clips_before = self.clipper.runs if self.clipper is not None else 0
        loss_fn = self.model.loss_fn
        loss_fn.per_token, loss_fn.poison = False, faults.armed("nan_loss", step)
        try:
            loss = self.engine.train_batch(data_iter=iter([pipe_inputs(mb, self.dist.device) for mb in micro_batches]))
        finally:
            loss_fn.poison = False
        if self.last_step_finite and self.clipper is not None and self.clipper.runs != clips_before + 1:
            raise ClipperNotRunError(
                f"step {step}: engine.clip_mode=per_partition, but the clipper ran {self.clipper.runs - clips_before} "
                f"times in this pipeline step instead of once; the update may be unclipped, stopping")
        return loss.detach().float()

    def evaluate(self, eval_sets, ablated_domains, calib_sets=None, calibration=None, report=None):
        """No calibration at PP > 1: the config refuses it."""
        return evaluate(self, eval_sets, ablated_domains, report=report)

    def per_token_losses(self, batches, ablated_domains):
        return per_token_losses(self, batches, ablated_domains)


@torch.no_grad()
def per_token_losses(state: PipelineTrainer, batches: list[dict],
                     ablated_domains: list[int] | None) -> list[torch.Tensor]:
    """Per-token losses [B, S] of every batch (0 where unlabelled) through the pipeline, on every
    rank (the last stage computes them, then broadcasts them over the pipeline group); ablated
    domains switched off in every stage's blocks. Collective over the whole world."""
    from megatron.core import parallel_state as ps

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
def evaluate(state: PipelineTrainer, eval_sets: dict[str, list[dict]], ablated_domains: list[int],
             report=None) -> dict:
    """Held-out loss per set, full and ablated, as :func:`pipeline.components.evaluation.evaluate`
    computes it at PP=1 (no calibration at PP > 1: the config refuses it)."""
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

    local = {module.canonical_names[n]: t for n, t in gather_full_state_dict(module, grads=grads).items()}
    parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    return out
