"""The trainer of a model that is whole on every rank (no pipeline stages): tensor, sequence,
expert and data parallelism, ZeRO 0/1/2, fp32 or bf16, all inside one DeepSpeed engine.

A step is DeepSpeed's ``forward``/``backward``/``step`` per micro-batch; DeepSpeed applies the
update at the last one (its gradient-accumulation boundary). Before that update the step agrees
whether it is finite (:func:`pipeline.engine.trainer.decide_update`) and, at ZeRO-0, clips
``param.grad`` per partition; at ZeRO-1/2 the clip runs inside the optimizer step (the hook of
:mod:`pipeline.backend.deepspeed_internals`).
"""

from __future__ import annotations

import torch

from pipeline.backend import deepspeed_internals as dsi
from pipeline.backend.distributed import MegatronMPU
from pipeline.components import evaluation, faults
from pipeline.engine.trainer import ClipperNotRunError, Trainer, decide_update, to_device


class FlatTrainer(Trainer):
    """The model whole on every rank (``engine.pipeline_parallel: 1``)."""

    @staticmethod
    def wrap(cfg, dist, model):
        return model.to(dist.device)

    @staticmethod
    def mpu():
        return MegatronMPU()

    def train_step(self, micro_batches: list[dict], step: int | None = None) -> torch.Tensor:
        engine = self.engine
        self.check_micro_batches(micro_batches)
        total = torch.zeros((), device=self.dist.device)
        finite = torch.ones((), dtype=torch.bool, device=self.dist.device)
        for i, mb in enumerate(micro_batches):
            mb = to_device(mb, self.dist.device)
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
                if not decide_update(self, finite):
                    dsi.skip_step(engine)
                    total += loss.detach().float()
                    break
                clips_before = self.clipper.runs if self.clipper is not None else 0
                if self.clipper is not None and not self.clipper.uses_zero_partition:
                    self.clipper.clip_param_grads()
            engine.step()
            if last and self.clipper is not None and self.clipper.runs != clips_before + 1:
                raise ClipperNotRunError(
                    f"step {step}: engine.clip_mode=per_partition, but the clipper ran "
                    f"{self.clipper.runs - clips_before} times in this step instead of once (DeepSpeed did not "
                    f"call the hook of pipeline/backend/deepspeed_internals.py); the update may be unclipped, "
                    f"stopping")
            total += loss.detach().float()
        total /= len(micro_batches)
        if self.dist.dp_size > 1:
            torch.distributed.all_reduce(total, group=MegatronMPU().get_data_parallel_group())  # EP-aware
            total /= self.dist.dp_size
        return total

    def evaluate(self, eval_sets, ablated_domains, calib_sets=None, calibration=None, report=None):
        return evaluation.evaluate(self.model, eval_sets, calib_sets, ablated_domains, calibration,
                                   self.dist.device, report=report)

    @torch.no_grad()
    def per_token_losses(self, batches, ablated_domains):
        model, device = self.model, self.dist.device
        was_training = model.training
        model.eval()
        model.set_ablated(ablated_domains or [])
        try:
            out = []
            for b in batches:
                doc_ids = b.get("doc_ids")
                out.append(model(b["input_ids"].to(device), labels=b["labels"].to(device), return_per_token=True,
                                 doc_ids=None if doc_ids is None else doc_ids.to(device)).float())
            return out
        finally:
            model.set_ablated([])
            model.train(was_training)
