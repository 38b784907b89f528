"""`sgtm check-isolation`: it says `holds` for an isolating config and `leaks` for one that is not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sgtm.codes import Mode
from pipeline.sgtm.isolation_check import check_isolation, isolation_batch
from tests.fixtures import tiny_config

CLIP = {"grad_clip": 0.05, "micro_batch_size": 4}


@given(rows=st.integers(1, 9), seq=st.integers(9, 40), step=st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_batches_differ_only_in_forget_span_content(rows, seq, step):
    a = isolation_batch(step, 1, Mode.FORGET, rows, seq, 50)
    b = isolation_batch(step, 2, Mode.FORGET, rows, seq, 50)
    c = isolation_batch(step, 2, Mode.UNLABELLED, rows, seq, 50)
    forget = a["modes"] == Mode.FORGET
    assert forget.any() and (a["modes"] == Mode.RETAIN).any()
    assert torch.equal(a["modes"], b["modes"]) and torch.equal(c["input_ids"], b["input_ids"])
    assert torch.equal(a["input_ids"][~forget], b["input_ids"][~forget])
    assert not torch.equal(a["input_ids"][forget], b["input_ids"][forget])
    assert torch.equal(c["modes"] == Mode.UNLABELLED, forget)
    assert torch.equal(a["labels"][:, :-1], a["input_ids"][:, 1:])


@pytest.mark.parametrize("arch", ["gpt-neo", "llama3"])
def test_check_isolation_holds_with_per_partition_clipping(single_process_world, arch):
    model = {"n_kv_heads": 2} if arch == "llama3" else {}
    sgtm = {"domains": [{"name": "es", "heads": [0, 1], "units": [3, 10, 40]}]} if arch == "llama3" else {}
    cfg = tiny_config(arch, "sgtm", two_domains=False, engine={"zero_stage": 1, **CLIP}, model=model, sgtm=sgtm)
    result = check_isolation(cfg, steps=4, log=lambda m: None)
    assert result["verdict"] == "holds", result
    assert result["forget_tensors_changed"] > 0 and result["control_retain_tensors_changed"] > 0


def test_check_isolation_finds_the_global_clipping_leak(single_process_world):
    """The mutation: one clip norm over every group lets forget gradients scale retain updates."""
    cfg = tiny_config("gpt-neo", "sgtm", two_domains=False, engine={"clip_mode": "global", **CLIP})
    result = check_isolation(cfg, steps=3, log=lambda m: None)
    assert result["verdict"] == "leaks" and result["leaked"], result
