"""Held-out evaluation: full model, ablated model, and ablated model after logit calibration.

Ablation here is the forward switch (:meth:`Transformer.set_ablated`), which computes exactly
what the zeroed model computes, so the training model is never modified. Calibration fits a
per-vocabulary bias on the ablated model's logits of separate calibration batches; the model
is frozen, so its logits are computed once and only the bias is optimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import CalibrationConfig
from pipeline.model.transformer import IGNORE_INDEX, Transformer, token_losses

SETS = ("forget", "retain", "adjacent")


@dataclass
class SetResult:
    full: float
    ablated: float
    calibrated: float | None
    tokens: int
    per_token: dict[str, torch.Tensor]  # mode -> losses of valid tokens (CPU, float32)


def _valid(batch: dict) -> torch.Tensor:
    return batch["labels"] != IGNORE_INDEX


@torch.no_grad()
def _logits(model: Transformer, batches: list[dict], device, ablated_domains: list[int] | None) -> list[torch.Tensor]:
    model.set_ablated(ablated_domains or [])
    try:
        out = []
        for b in batches:
            hidden = model(b["input_ids"].to(device), doc_ids=b["doc_ids"].to(device), return_hidden=True)
            out.append(model.logits(hidden).float())
        return out
    finally:
        model.set_ablated([])


def fit_calibration_bias(model: Transformer, calib: dict[str, list[dict]], ablated_domains: list[int],
                         cfg: CalibrationConfig, device, seed: int = 0) -> torch.Tensor:
    """Per-vocabulary bias (this TP rank's vocab shard) minimising
    loss_forget + alpha * loss_retain + beta * loss_adjacent on the ablated model."""
    weights = {"forget": 1.0, "retain": cfg.alpha, "adjacent": cfg.beta}
    cached = {name: (_logits(model, batches, device, ablated_domains), [b["labels"].to(device) for b in batches])
              for name, batches in calib.items() if batches and weights.get(name, 0.0) > 0}
    vocab_local = model.embedding.weight.shape[0]
    bias = torch.zeros(vocab_local, device=device, requires_grad=True)
    if not cached:
        return bias.detach()
    torch.manual_seed(seed)  # Adam is deterministic; kept for symmetry with other components
    opt = torch.optim.Adam([bias], lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for name, (logit_list, label_list) in cached.items():
            loss_sum = sum(token_losses(lg + bias, lb).sum() for lg, lb in zip(logit_list, label_list))
            count = sum(int((lb != IGNORE_INDEX).sum()) for lb in label_list)
            total = total + weights[name] * loss_sum / max(count, 1)
        total.backward()
        opt.step()
    return bias.detach()


@torch.no_grad()
def evaluate(model: Transformer, eval_sets: dict[str, list[dict]], calib_sets: dict[str, list[dict]] | None,
             ablated_domains: list[int], calibration: CalibrationConfig | None, device) -> dict[str, SetResult]:
    """Loss per held-out set for the full, ablated and calibrated model (identical on every rank)."""
    was_training = model.training
    model.eval()
    try:
        bias = None
        if calibration is not None and calib_sets:
            with torch.enable_grad():
                bias = fit_calibration_bias(model, calib_sets, ablated_domains, calibration, device)
        results = {}
        for name, batches in eval_sets.items():
            if not batches:
                continue
            full = _logits(model, batches, device, None)
            abl = _logits(model, batches, device, ablated_domains)
            per = {"full": [], "ablated": [], "calibrated": []}
            for b, lf, la in zip(batches, full, abl):
                labels, valid = b["labels"].to(device), _valid(b).to(device)
                per["full"].append(token_losses(lf, labels)[valid])
                per["ablated"].append(token_losses(la, labels)[valid])
                if bias is not None:
                    per["calibrated"].append(token_losses(la + bias, labels)[valid])
            cat = {k: torch.cat(v).cpu() for k, v in per.items() if v}
            results[name] = SetResult(
                full=float(cat["full"].mean()), ablated=float(cat["ablated"].mean()),
                calibrated=float(cat["calibrated"].mean()) if "calibrated" in cat else None,
                tokens=int(cat["full"].numel()), per_token=cat)
        return results
    finally:
        model.train(was_training)
