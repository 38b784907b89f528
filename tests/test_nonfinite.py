"""The non-finite policy per clip group (docs/architecture.md, "Non-finite gradients"): a forget
group whose gradient is not finite is dropped and the retain update goes on, bit for bit as if
the forget positions had been harmless; a non-finite retain gradient still skips the step."""

from __future__ import annotations

import pytest
import torch

from pipeline.codes import ClipGroup, Mode
from pipeline.engine.engine import build_engine, train_step
from pipeline.sgtm import masking
from tests.support.batches import mixed_batch
from tests.support.configs import tiny_config
from tests.support.isolation import slice_changes


def _forget_positions(batch: dict) -> torch.Tensor:
    return masking.position_modes(batch["modes"], batch["labels"], batch["target_modes"]) >= Mode.FORGET


def _two_steps(cfg, poison: bool, mutate=None) -> tuple[dict, object]:
    """Step 1 clean; step 2 with every forget position's embedding output at +inf when ``poison``."""
    state = build_engine(cfg)
    if mutate is not None:
        mutate(state)
    train_step(state, [mixed_batch(0)])
    batch = mixed_batch(1)
    hot = _forget_positions(batch)[..., None]
    handle = None
    if poison:
        handle = state.model.embedding.register_forward_hook(lambda m, i, out: out.masked_fill(hot, float("inf")))
    try:
        train_step(state, [batch])
    finally:
        if handle is not None:
            handle.remove()
    params = {n: p.detach().float().clone() for n, p in state.model.named_parameters()}
    return params, state


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "fp32"), (1, "bf16")])
def test_a_nonfinite_forget_group_is_dropped_and_the_retain_update_goes_on(single_process_world, zero, precision):
    cfg = tiny_config("gpt-neo", "sgtm", engine={"zero_stage": zero, "grad_clip": 0.5, "precision": precision},
                      optimizer={"lr": 3e-3}, train={"steps": 2})
    clean, _ = _two_steps(cfg, poison=False)
    poisoned, state = _two_steps(cfg, poison=True)
    assert state.last_step_finite
    assert state.dropped_groups == [ClipGroup.FORGET, ClipGroup.FORGET + 1]  # both domains have forget positions
    assert all(bool(torch.isfinite(p).all()) for p in poisoned.values())
    leaked, forget_changed, _ = slice_changes(state.model, clean, poisoned)
    assert not leaked, f"the retain update changed with non-finite forget positions: {leaked[:5]}"
    assert forget_changed > 0  # the forget groups did not take the clean run's gradient


def test_the_policy_test_fails_when_any_nonfinite_group_skips_the_step(single_process_world):
    """The test above can fail: one finiteness check over every group (the old policy) lets the
    forget positions skip the retain update."""
    cfg = tiny_config("gpt-neo", "sgtm", engine={"zero_stage": 0, "grad_clip": 0.5}, optimizer={"lr": 3e-3},
                      train={"steps": 2})
    clean, _ = _two_steps(cfg, poison=False)

    def one_check(state):
        state.grad_groups = None

    poisoned, state = _two_steps(cfg, poison=True, mutate=one_check)
    assert not state.last_step_finite
    leaked, _, _ = slice_changes(state.model, clean, poisoned)
    assert leaked


def test_a_nonfinite_retain_gradient_still_skips_the_step(single_process_world):
    """Non-forget positions poisoned: the retain group is not finite, so no group steps."""
    cfg = tiny_config("gpt-neo", "sgtm", engine={"zero_stage": 2, "grad_clip": 0.5}, optimizer={"lr": 3e-3},
                      train={"steps": 2})
    state = build_engine(cfg)
    train_step(state, [mixed_batch(0)])
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    batch = mixed_batch(1)
    cold = ~_forget_positions(batch)[..., None]
    handle = state.model.embedding.register_forward_hook(lambda m, i, out: out.masked_fill(cold, float("inf")))
    try:
        train_step(state, [batch])
    finally:
        handle.remove()
    assert not state.last_step_finite
    assert all(torch.equal(before[n], p.detach()) for n, p in state.model.named_parameters())
