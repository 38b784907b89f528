"""Build the model and the DeepSpeed engine from a config, and run one masked training step.

There is no home-made DDP or TP: DeepSpeed owns data parallelism, ZeRO, precision and the
optimizer; megatron-core owns tensor parallelism. Masking needs nothing from the engine because
it happens inside autograd (see :mod:`pipeline.sgtm.masking`).

:func:`build_engine` returns a :class:`~pipeline.engine.trainer.Trainer`, the one interface
whatever the parallel layout: :func:`trainer_class` picks the flat or the pipeline trainer once,
and the construction below is the same for both, the layout filling in its parts (which blocks
this rank keeps, the module DeepSpeed gets, its config additions, the ``mpu``).
"""

from __future__ import annotations

import math

import torch

from pipeline.backend import deepspeed_internals as dsi
from pipeline.backend.distributed import DistInfo, init_distributed
from pipeline.components.clipping import PartitionClipper
from pipeline.config import ExperimentConfig
from pipeline.engine.flat import FlatTrainer
from pipeline.engine.trainer import Trainer
from pipeline.model.transformer import Transformer
from pipeline.sgtm.partition import ForgetPartition


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


def trainer_class(dist: DistInfo) -> type[Trainer]:
    """The trainer of this layout, chosen once: the pipeline trainer when the model is split into
    stages (``engine.pipeline_parallel > 1``), else the flat one. (The pipeline trainer's module
    imports DeepSpeed, which must wait until :func:`init_distributed` has picked its accelerator.)"""
    if dist.pp_size > 1:
        from pipeline.engine.pipe import PipelineTrainer

        return PipelineTrainer
    return FlatTrainer


def build_engine(cfg: ExperimentConfig) -> Trainer:
    dsi.check_version()  # before anything relies on DeepSpeed's internals
    e = cfg.engine
    per_partition = e.grad_clip > 0 and e.clip_mode == "per_partition"
    if per_partition and e.zero_stage == 0 and e.precision == "bf16":
        raise ValueError("engine.clip_mode: per_partition clipping with bf16 needs zero_stage 1 or 2 "
                         "(DeepSpeed's bf16 ZeRO-0 optimizer keeps gradients out of reach)")
    dist = init_distributed(cfg.engine)
    import deepspeed

    layout = trainer_class(dist)
    partition, model = build_model(cfg, dist, layout.kept_blocks(cfg, dist))
    module = layout.wrap(cfg, dist, model)
    ds_config = layout.configure(deepspeed_config(cfg, dist))
    if per_partition:
        dsi.check_clip_config(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, cfg.optimizer.weight_decay),
        config=ds_config, mpu=layout.mpu(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)))
    clipper, groups = partition_groups(cfg, module, partition, engine, dist)
    state = layout(cfg, dist, partition, module, engine, clipper, grad_groups=groups)
    state.attach()
    return state


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


def train_step(state: Trainer, micro_batches: list[dict], step: int | None = None) -> torch.Tensor:
    """One optimizer step of ``state``'s trainer (:meth:`Trainer.train_step`)."""
    return state.train_step(micro_batches, step)
