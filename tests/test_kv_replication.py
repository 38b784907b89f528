"""Replicated KV heads (model.n_kv_heads < engine.tensor_parallel) through DeepSpeed: training
equals TP=1 (losses and clip norms) at ZeRO-1/2, and a TP=2 checkpoint consolidates to one K/V
copy and resumes at TP=1. The gradient/ablation/partition checks are in tests/test_architectures.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.engine.engine import build_engine, train_step
from pipeline.model.tp_state import gather_full_state_dict
from tests.support.batches import mixed_batch
from tests.support.configs import mqa_config
from tests.support.launch import run_scenario


def scenario_replicated_kv_checkpoint(out: Path, steps: int) -> dict:
    """TP=2 with the KV head replicated: ``steps`` DeepSpeed steps, a checkpoint as ``sgtm train``
    writes it (``tp_layout`` with the replicas), the live consolidated train state, the model
    ``sgtm consolidate`` reads from the files, and the loss of one more step."""
    from pipeline.components import checkpoint
    from pipeline.config import to_dict
    from pipeline.train.loop import tp_layout
    from pipeline.train.offline import consolidate

    cfg = mqa_config(2)
    state = build_engine(cfg)
    for i in range(steps):
        train_step(state, [mixed_batch(seed=i, n_domains=1)])
    layout = tp_layout(state.engine.module)
    client = {"step": steps, "tp_layout": layout, "config": to_dict(cfg), "partition": state.partition.to_dict()}
    path = checkpoint.save(state.engine, out / "ckpt", steps, client, {}, keep=1)
    live = checkpoint.full_train_state(state.engine)
    weights = gather_full_state_dict(state.engine.module)
    nxt = float(train_step(state, [mixed_batch(seed=99, n_domains=1)]))
    if dist.get_rank() == 0:
        torch.save({"live": live, "weights": weights, "next_loss": nxt, "consolidated": consolidate(path).state,
                    "tag": str(path)}, out / "mqa_ckpt.pt")
    return {"qkv_layout": layout["blocks.0.attn.qkv.weight"]}


def test_replicated_kv_checkpoint_consolidates_and_resumes_at_tp1(single_process_world, tmp_path):
    """A TP=2 checkpoint with the KV head replicated: its tp_layout records the copies, the
    consolidated train state read from the files (weights, Adam moments, step) equals the live
    engine's with one K/V copy, `sgtm consolidate` gives the gathered weights, and a TP=1 engine
    loaded from it takes the same next step (loss to 1e-5)."""
    from pipeline.components import checkpoint

    result = run_scenario(2, scenario_replicated_kv_checkpoint, tmp_path, steps=2)
    hd = 4
    assert result["qkv_layout"] == [0, 1, 2, 2 * hd]
    saved = torch.load(tmp_path / "mqa_ckpt.pt", weights_only=True)
    params, meta = checkpoint.consolidated_train_state(Path(saved["tag"]))
    cfg1 = mqa_config(1)
    rows = cfg1.model.d_model + 2 * cfg1.model.kv_dim
    assert params["blocks.0.attn.qkv.weight"]["param"].shape[0] == rows
    for name, states in saved["live"].items():
        for key, value in states.items():
            assert torch.equal(params[name][key], value), (name, key)
    for name, w in saved["weights"].items():
        assert torch.equal(saved["consolidated"][name], w), name
    fresh = build_engine(cfg1)
    checkpoint.apply_train_state(fresh.engine, params, meta)
    loss = float(train_step(fresh, [mixed_batch(seed=99, n_domains=1)]))
    assert loss == pytest.approx(saved["next_loss"], abs=1e-5)


def scenario_mqa_engine_losses(out: Path, steps: int, zeros: list[int], clip: float) -> dict:
    """TP=2 with the KV head replicated, DeepSpeed ZeRO ``zeros``: the losses and per-partition
    clip norms of ``steps`` steps (clipping at ``clip``) on fixed mixed-mode batches; then, as a
    mutation, ZeRO-2 with the clipper counting every K/V copy (``mut_copies_counted``)."""
    from pipeline.components import clipping

    result = {}
    for zero in [*zeros, "mut_copies_counted"]:
        mutated = zero == "mut_copies_counted"
        if mutated:
            zero, real = 2, clipping.replica_copy_rows
            clipping.replica_copy_rows = lambda p, rank: None
        cfg = mqa_config(2)
        cfg.engine.zero_stage, cfg.engine.grad_clip = zero, clip
        state = build_engine(cfg)
        losses, norms = [], []
        for i in range(steps):
            losses.append(float(train_step(state, [mixed_batch(seed=i, n_domains=1)])))
            norms.append(state.clipper.last_norms.tolist())
        result["mut_copies_counted" if mutated else f"zero{zero}"] = {"losses": losses, "norms": norms}
        if mutated:
            clipping.replica_copy_rows = real
    return result


@pytest.mark.parametrize("zero", [1, 2])
def test_replicated_kv_trains_through_deepspeed_like_tp1(single_process_world, tmp_path_factory, zero):
    """5 DeepSpeed steps at TP=2 with the KV head replicated (ZeRO-1 and ZeRO-2: the clipper reads
    DeepSpeed's gradient partition) give TP=1's losses (1e-5) and per-partition clip norms (1e-5
    relative: the K/V copies counted once), with clipping that binds; counting every copy (the
    mutation) changes the norms."""
    clip, steps = 0.05, 5
    key = "mqa_engine"
    cache = tmp_path_factory.getbasetemp() / key
    if not (cache / "result.json").exists():
        cache.mkdir(exist_ok=True)
        run_scenario(2, scenario_mqa_engine_losses, cache, steps=steps, zeros=[1, 2], clip=clip)
    import json

    result = json.loads((cache / "result.json").read_text())
    got = result[f"zero{zero}"]
    cfg = mqa_config(1)
    cfg.engine.zero_stage, cfg.engine.grad_clip = zero, clip
    state = build_engine(cfg)
    for i in range(steps):
        loss = float(train_step(state, [mixed_batch(seed=i, n_domains=1)]))
        assert got["losses"][i] == pytest.approx(loss, abs=1e-5), i
        norms = state.clipper.last_norms.tolist()
        assert got["norms"][i] == pytest.approx(norms, rel=1e-5), i
        assert max(norms) > clip, norms  # the clip binds (at least the largest group)
        if zero == 2:  # mutation: every K/V copy counted, the norms (so the clip) are not TP=1's
            assert result["mut_copies_counted"]["norms"][i] != pytest.approx(norms, rel=1e-5), i
