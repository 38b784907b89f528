"""The trainer interface (pipeline/engine/trainer.py) on the flat layout: ``build_engine`` picks
the flat trainer at PP=1, ``engine.train_step`` is the trainer's step, and its per-token losses
are what its evaluation averages (full and ablated). The pipeline trainer's are checked against
PP=1 in tests/test_pipeline_parallel.py."""

from __future__ import annotations

import torch

from pipeline.engine.engine import build_engine, train_step, trainer_class
from pipeline.engine.flat import FlatTrainer
from pipeline.model.transformer import IGNORE_INDEX
from tests.support.batches import mixed_batch
from tests.support.configs import tiny_config


def test_the_flat_trainer_is_chosen_at_pp1_and_its_losses_are_its_evaluation(single_process_world):
    assert trainer_class(single_process_world) is FlatTrainer
    state = build_engine(tiny_config("gpt-neo", "sgtm", engine={"zero_stage": 1, "grad_clip": 1.0}))
    assert isinstance(state, FlatTrainer)
    loss = train_step(state, [mixed_batch(0)], step=1)
    assert state.last_step_finite and torch.isfinite(loss)
    batches = [mixed_batch(1), mixed_batch(2)]
    result = state.evaluate({"forget": batches}, [0], report=None)["forget"]
    for name, ablated in (("full", None), ("ablated", [0])):
        per_token = state.per_token_losses(batches, ablated)
        assert [t.shape for t in per_token] == [b["input_ids"].shape for b in batches]
        valid = torch.cat([t[b["labels"] != IGNORE_INDEX] for t, b in zip(per_token, batches)])
        torch.testing.assert_close(valid, result.per_token[name], rtol=1e-5, atol=1e-6)
    assert result.ablated != result.full  # domain 0's heads and units were switched off
    assert state.model.training  # evaluation leaves the model as it found it
