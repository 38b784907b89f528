"""Held-out evaluation: full model, ablated model, and ablated model after logit calibration.

Ablation here is the forward switch (:meth:`Transformer.set_ablated`), which computes exactly
what the zeroed model computes, so the training model is never modified. Calibration fits a
per-vocabulary bias on the ablated model's logits of separate calibration batches; the model
is frozen, so its logits are computed once and only the bias is optimised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import CalibrationConfig
from pipeline.model.transformer import IGNORE_INDEX, Transformer, token_losses

SETS = ("forget", "retain", "adjacent")

# Progress messages (one line each) for batch logs; None: silent. The training loop passes its
# metrics logger's note(), so a SLURM log shows where a long evaluation or calibration is.
Report = Callable[[str], None] | None


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
                         cfg: CalibrationConfig, device, seed: int = 0, report: Report = None) -> torch.Tensor:
    """Per-vocabulary bias (this TP rank's vocab shard) minimising
    loss_forget + alpha * loss_retain + beta * loss_adjacent on the ablated model.

    The objective is convex in the bias; it is minimised by gradient descent with momentum on
    the weight-normalised loss (Adam was measured to over-fit: it moves a rarely seen token's
    bias by ~lr every step whatever its gradient, dragging down tokens the calibration text
    lacks). The ablated model's final hidden states are computed once; each step draws a seeded
    minibatch of ``cfg.tokens_per_step`` labelled tokens per set and recomputes only the LM head,
    so calibration can use many tokens at the cost of a few small matmuls per step (few tokens
    over-fit a 50k-entry bias: tokens absent from them get pushed down)."""
    weights = {"forget": 1.0, "retain": cfg.alpha, "adjacent": cfg.beta}
    vocab_local = model.embedding.weight.shape[0]
    bias = torch.zeros(vocab_local, device=device, requires_grad=True)
    cached = {}
    model.set_ablated(ablated_domains)
    try:
        with torch.no_grad():
            for name, batches in calib.items():
                w = weights.get(name.split(":")[0], 0.0)
                if not batches or w <= 0:
                    continue
                hs, ys = [], []
                for b in batches:
                    h = model(b["input_ids"].to(device), doc_ids=b["doc_ids"].to(device), return_hidden=True)
                    valid = (b["labels"] != IGNORE_INDEX).to(device)
                    hs.append(h[valid])
                    ys.append(b["labels"].to(device)[valid])
                cached[name] = (w, torch.cat(hs), torch.cat(ys))
    finally:
        model.set_ablated([])
    if not cached:
        return bias.detach()
    gen = torch.Generator().manual_seed(seed)
    opt = (torch.optim.SGD([bias], lr=cfg.lr, momentum=0.9) if cfg.optimizer == "sgd"
           else torch.optim.Adam([bias], lr=cfg.lr))
    norm = sum(w for w, _, _ in cached.values())
    every = max(1, cfg.steps // 4)
    for i in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for w, h, y in cached.values():
            idx = torch.randint(0, y.numel(), (min(cfg.tokens_per_step, y.numel()),), generator=gen).to(device)
            with torch.no_grad():
                logits = model.logits(h[idx][None]).float()
            total = total + (w / norm) * token_losses(logits + bias, y[idx][None]).mean()
        total.backward()
        opt.step()
        if report is not None and ((i + 1) % every == 0 or i + 1 == cfg.steps):
            report(f"calibration step {i + 1}/{cfg.steps}: loss {float(total):.4f}")
    return bias.detach()


@torch.no_grad()
def evaluate(model: Transformer, eval_sets: dict[str, list[dict]], calib_sets: dict[str, list[dict]] | None,
             ablated_domains: list[int], calibration: CalibrationConfig | None, device,
             report: Report = None) -> dict[str, SetResult]:
    """Loss per held-out set for the full, ablated and calibrated model (identical on every rank);
    ``report`` gets one line per phase (calibration progress, each set's losses)."""
    was_training = model.training
    model.eval()
    try:
        bias = None
        if calibration is not None and calib_sets:
            with torch.enable_grad():
                bias = fit_calibration_bias(model, calib_sets, ablated_domains, calibration, device,
                                            report=report)
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
                if bias is not None:  # before the ablated loss: token_losses consumes its logits
                    per["calibrated"].append(token_losses(la + bias, labels)[valid])
                per["ablated"].append(token_losses(la, labels)[valid])
            cat = {k: torch.cat(v).cpu() for k, v in per.items() if v}
            results[name] = SetResult(
                full=float(cat["full"].mean()), ablated=float(cat["ablated"].mean()),
                calibrated=float(cat["calibrated"].mean()) if "calibrated" in cat else None,
                tokens=int(cat["full"].numel()), per_token=cat)
            if report:
                r = results[name]
                cal = f" calibrated {r.calibrated:.4f}" if r.calibrated is not None else ""
                report(f"{name}: {len(batches)} batches, {r.tokens:,} tokens: full {r.full:.4f} "
                       f"ablated {r.ablated:.4f}{cal}")
        return results
    finally:
        model.train(was_training)
