"""Build the model and the DeepSpeed engine from a config, and run one masked training step.

There is no home-made DDP or TP: DeepSpeed owns data parallelism, ZeRO, precision and the
optimizer; megatron-core owns tensor parallelism. Masking needs nothing from the engine because
it happens inside autograd (see :mod:`pipeline.sgtm.masking`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.components.clipping import PartitionClipper
from pipeline.config import ExperimentConfig
from pipeline.engine import deepspeed_internals as dsi
from pipeline.engine.distributed import DistInfo, MegatronMPU, init_distributed
from pipeline.model.transformer import Transformer
from pipeline.sgtm.partition import ForgetPartition


@dataclass
class TrainState:
    cfg: ExperimentConfig
    dist: DistInfo
    partition: ForgetPartition
    model: Transformer
    engine: object  # deepspeed.DeepSpeedEngine
    clipper: PartitionClipper | None = None  # clips per partition (engine.grad_clip > 0)
    last_step_finite: bool = True  # False: the last train_step saw a non-finite loss/gradient and skipped
    # The per-partition groups (engine.clip_mode per_partition, clipping or not): they decide what
    # a non-finite gradient does (:func:`decide_update`).
    grad_groups: PartitionClipper | None = None
    dropped_groups: list[int] = field(default_factory=list)  # forget groups dropped in the last step


def build_model(cfg: ExperimentConfig, dist: DistInfo,
                keep_blocks: range | None = None) -> tuple[ForgetPartition, Transformer]:
    """Same seed on every rank: megatron's CPU init builds each master weight whole and slices
    it, so the logical model is the same for any TP size (and, ``keep_blocks``: a pipeline
    stage's blocks, the others dropped as soon as built, for any PP size)."""
    partition = ForgetPartition(cfg.model, cfg.sgtm, dist.tp_size)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, partition, cfg.sgtm.strategy, sequence_parallel=cfg.engine.sequence_parallel,
                        keep_blocks=keep_blocks)
    return partition, model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; not norms or biases (GPT-NeoX/Megatron convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: ExperimentConfig, dist: DistInfo) -> dict:
    e, o = cfg.engine, cfg.optimizer
    ds = {
        "train_micro_batch_size_per_gpu": e.micro_batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "train_batch_size": e.micro_batch_size * e.grad_accum_steps * dist.dp_size,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": e.zero_stage},
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True}},
        # Per-partition clipping is ours (pipeline/components/clipping.py); DeepSpeed's is global.
        "gradient_clipping": e.grad_clip if e.clip_mode == "global" else 0.0,
    }
    if e.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def lr_factor(step: int, cfg: ExperimentConfig) -> float:
    """Linear warmup over ``warmup_steps`` (the first step already trains), then cosine to
    ``min_lr_ratio`` at ``train.steps``."""
    o, total = cfg.optimizer, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(cfg: ExperimentConfig) -> TrainState:
    dsi.check_version()  # before anything relies on DeepSpeed's internals
    e = cfg.engine
    per_partition = e.grad_clip > 0 and e.clip_mode == "per_partition"
    if per_partition and e.zero_stage == 0 and e.precision == "bf16":
        raise ValueError("engine.clip_mode: per_partition clipping with bf16 needs zero_stage 1 or 2 "
                         "(DeepSpeed's bf16 ZeRO-0 optimizer keeps gradients out of reach)")
    dist = init_distributed(cfg.engine)
    import deepspeed

    if dist.pp_size > 1:  # DeepSpeed's pipeline engine over the model's stages
        from pipeline.engine.pipe import build_pipeline_engine, stage_blocks

        keep = stage_blocks(cfg.model.n_layers, dist.pp_size)[dist.pp_rank]
        return build_pipeline_engine(cfg, dist, *build_model(cfg, dist, keep))
    partition, model = build_model(cfg, dist)
    model.to(dist.device)
    ds_config = deepspeed_config(cfg, dist)
    if per_partition:
        dsi.check_clip_config(ds_config)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay),
        config=ds_config, mpu=MegatronMPU(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)))
    clipper, groups = partition_groups(cfg, model, partition, engine, dist)
    return TrainState(cfg, dist, partition, model, engine, clipper, grad_groups=groups)


def partition_groups(cfg: ExperimentConfig, model, partition: ForgetPartition, engine,
                     dist: DistInfo) -> tuple[PartitionClipper | None, PartitionClipper | None]:
    """(clipper, groups): the per-partition groups whenever ``engine.clip_mode`` is per_partition
    (they decide the non-finite policy), attached as the clipper when ``engine.grad_clip`` > 0."""
    e = cfg.engine
    if e.clip_mode != "per_partition":
        return None, None
    groups = PartitionClipper(model, len(partition.domains), e.grad_clip, dist.device)
    if e.grad_clip <= 0:
        return None, groups
    groups.attach(engine)
    return groups, groups


class ClipperNotRunError(RuntimeError):
    """The per-partition clipper did not run exactly once in an applied step; one line."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _local_grads_finite(engine) -> torch.Tensor:
    """Are this rank's gradients finite (a bool tensor)?"""
    tensors = dsi.local_gradients(engine)
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def decide_update(state: TrainState, loss_finite: torch.Tensor) -> bool:
    """Whether to apply this step's update, agreed by every rank (docs/architecture.md,
    "Non-finite gradients"). With the per-partition groups: a non-finite forget group is dropped
    (its gradient selected to zero, listed in ``state.dropped_groups``) and the step goes on; a
    non-finite retain or joint(all) group skips it. The loss is not consulted there: a forget
    position's non-finite loss must not stop the retain update. Without the groups (global
    clipping, which mixes partitions anyway): any non-finite loss or gradient skips the step."""
    from pipeline.codes import ClipGroup

    state.dropped_groups = []
    groups = state.grad_groups
    if groups is None:
        state.last_step_finite = _all_true(loss_finite & _local_grads_finite(state.engine).to(loss_finite.device))
        return state.last_step_finite
    bad = groups.nonfinite_groups(state.engine.optimizer)
    if any(g < ClipGroup.FORGET for g in bad):
        state.last_step_finite = False
        return False
    if bad:
        groups.drop_groups(state.engine.optimizer, bad)
        state.dropped_groups = bad
    state.last_step_finite = True
    return True


def _all_true(flag: torch.Tensor) -> bool:
    """One scalar all-reduce (the only host sync this check adds to a step)."""
    bad = (~flag).float().reshape(1)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def train_step(state: TrainState, micro_batches: list[dict], step: int | None = None) -> torch.Tensor:
    """One optimizer step over ``grad_accum_steps`` micro-batches (modes may mix freely).

    Returns the step's mean loss averaged over micro-batches and data-parallel ranks (a tensor:
    the caller decides when to sync it to the host). A non-finite loss or gradient is handled by
    :func:`decide_update` (a forget group's is dropped; otherwise no rank applies the update and
    ``state.last_step_finite`` is False); the caller decides whether to continue
    (``train.nonfinite``). ``step`` (1-based) only arms test faults."""
    from pipeline.components import faults

    if state.dist.pp_size > 1:
        from pipeline.engine.pipe import train_step as pipe_train_step

        return pipe_train_step(state, micro_batches, step)
    engine = state.engine
    if len(micro_batches) != state.cfg.engine.grad_accum_steps:
        raise ValueError(f"expected {state.cfg.engine.grad_accum_steps} micro-batches, got {len(micro_batches)}")
    total = torch.zeros((), device=state.dist.device)
    finite = torch.ones((), dtype=torch.bool, device=state.dist.device)
    for i, mb in enumerate(micro_batches):
        mb = to_device(mb, state.dist.device)
        loss = engine(mb["input_ids"], labels=mb["labels"], modes=mb.get("modes"), doc_ids=mb.get("doc_ids"),
                      target_modes=mb.get("target_modes"))
        last = i == len(micro_batches) - 1
        if i == 0 and faults.armed("kill_in_step", step):
            faults.kill_self()
        if last and faults.armed("nan_loss", step):
            loss = loss * float("nan")
        if last and faults.armed("nan_grad", step):
            loss.register_hook(lambda g: g * float("nan"))
        finite = finite & torch.isfinite(loss.detach()).all()
        engine.backward(loss)
        if last:
            if not decide_update(state, finite):
                dsi.skip_step(engine)
                total += loss.detach().float()
                break
            clips_before = state.clipper.runs if state.clipper is not None else 0
            if state.clipper is not None and not state.clipper.uses_zero_partition:
                state.clipper.clip_param_grads()
        engine.step()
        if last and state.clipper is not None and state.clipper.runs != clips_before + 1:
            raise ClipperNotRunError(
                f"step {step}: engine.clip_mode=per_partition, but the clipper ran "
                f"{state.clipper.runs - clips_before} times in this step instead of once (DeepSpeed did not "
                f"call the hook of pipeline/engine/deepspeed_internals.py); the update may be unclipped, stopping")
        total += loss.detach().float()
    total /= len(micro_batches)
    if state.dist.dp_size > 1:
        torch.distributed.all_reduce(total, group=MegatronMPU().get_data_parallel_group())  # EP-aware
        total /= state.dist.dp_size
    return total
