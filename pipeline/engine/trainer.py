"""The one interface the train loop uses, whatever the parallel layout, and the step helpers
both trainers share.

A :class:`Trainer` is a run's state (config, process groups, partition, model, DeepSpeed engine,
clipper, what the last step did) plus three operations: :meth:`~Trainer.train_step` (one
optimizer step over ``grad_accum_steps`` micro-batches), :meth:`~Trainer.evaluate` (held-out
losses, full/ablated/calibrated) and :meth:`~Trainer.per_token_losses`. Two layouts implement
it: :class:`pipeline.engine.flat.FlatTrainer` (one module per rank; TP, SP, EP, DP, ZeRO) and
:class:`pipeline.engine.pipe.PipelineTrainer` (DeepSpeed's pipeline engine over the model's
stages). :func:`pipeline.engine.engine.build_engine` picks one, once, from the layout; nothing
after that asks which it is.

The non-finite policy (:func:`decide_update`) is the same for both: docs/architecture.md,
"Non-finite gradients".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.backend import deepspeed_internals as dsi
from pipeline.backend.distributed import DistInfo
from pipeline.codes import ClipGroup
from pipeline.components.clipping import PartitionClipper
from pipeline.components.evaluation import Report, SetResult
from pipeline.config import CalibrationConfig, ExperimentConfig
from pipeline.sgtm.partition import ForgetPartition


@dataclass
class Trainer:
    """A training run's state and the operations the loop calls on it (see the module doc)."""

    cfg: ExperimentConfig
    dist: DistInfo
    partition: ForgetPartition
    model: torch.nn.Module  # the Transformer (flat) or this stage's pipeline module
    engine: object  # deepspeed.DeepSpeedEngine (PipelineEngine under pipeline parallelism)
    clipper: PartitionClipper | None = None  # clips per partition (engine.grad_clip > 0)
    last_step_finite: bool = True  # False: the last train_step saw a non-finite loss/gradient and skipped
    # The per-partition groups (engine.clip_mode per_partition, clipping or not): they decide what
    # a non-finite gradient does (:func:`decide_update`).
    grad_groups: PartitionClipper | None = None
    dropped_groups: list[int] = field(default_factory=list)  # forget groups dropped in the last step

    # ---- construction (build_engine calls these, in this order, on the chosen class) ----------

    @staticmethod
    def kept_blocks(cfg: ExperimentConfig, dist: DistInfo) -> range | None:
        """The blocks this rank builds and keeps (None: all of them)."""
        return None

    @staticmethod
    def wrap(cfg: ExperimentConfig, dist: DistInfo, model: torch.nn.Module) -> torch.nn.Module:
        """What ``deepspeed.initialize`` gets, from the built model."""
        raise NotImplementedError

    @staticmethod
    def configure(ds_config: dict) -> dict:
        """The layout's additions to the engine's DeepSpeed config."""
        return ds_config

    @staticmethod
    def mpu():
        """The ``mpu`` DeepSpeed gets (None: DeepSpeed's own groups)."""
        return None

    def attach(self) -> None:
        """After ``deepspeed.initialize``: hooks the layout needs on the engine."""

    # ---- what the loop calls -----------------------------------------------------------------

    def train_step(self, micro_batches: list[dict], step: int | None = None) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches (modes may mix freely).

        Returns the step's mean loss averaged over micro-batches and data-parallel ranks (a
        tensor: the caller decides when to sync it to the host). A non-finite loss or gradient is
        handled by :func:`decide_update` (a forget group's is dropped; otherwise no rank applies
        the update and :attr:`last_step_finite` is False); the caller decides whether to continue
        (``train.nonfinite``). ``step`` (1-based) only arms test faults."""
        raise NotImplementedError

    def evaluate(self, eval_sets: dict[str, list[dict]], ablated_domains: list[int],
                 calib_sets: dict[str, list[dict]] | None = None, calibration: CalibrationConfig | None = None,
                 report: Report = None) -> dict[str, SetResult]:
        """Held-out loss per set, full and ablated (and calibrated, given ``calibration`` and
        ``calib_sets``), identical on every rank; ``report`` gets one line per phase."""
        raise NotImplementedError

    def per_token_losses(self, batches: list[dict], ablated_domains: list[int] | None) -> list[torch.Tensor]:
        """Per-token losses [B, S] of every batch (0 where unlabelled), ``ablated_domains``
        switched off, on every rank; token ids, labels and documents only (no modes)."""
        raise NotImplementedError

    def check_micro_batches(self, micro_batches: list[dict]) -> None:
        if len(micro_batches) != self.cfg.engine.grad_accum_steps:
            raise ValueError(f"expected {self.cfg.engine.grad_accum_steps} micro-batches, got {len(micro_batches)}")


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


def _all_true(flag: torch.Tensor) -> bool:
    """One scalar all-reduce (the only host sync this check adds to a step)."""
    bad = (~flag).float().reshape(1)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def decide_update(state: Trainer, loss_finite: torch.Tensor) -> bool:
    """Whether to apply this step's update, agreed by every rank (docs/architecture.md,
    "Non-finite gradients"). With the per-partition groups: a non-finite forget group is dropped
    (its gradient selected to zero, listed in ``state.dropped_groups``) and the step goes on; a
    non-finite retain or joint(all) group skips it. The loss is not consulted there: a forget
    position's non-finite loss must not stop the retain update. Without the groups (global
    clipping, which mixes partitions anyway): any non-finite loss or gradient skips the step."""
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
