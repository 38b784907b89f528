"""tools/memory_estimate.py's weights, gradient and optimizer-state bytes equal what the real
DeepSpeed engine holds (tiny llama3, fp32, ZeRO 0 and 1, TP=1 and TP=2 with the one KV head
replicated), and a dropped term is seen (the mutations)."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))

import bench_memory  # noqa: E402
import memory_estimate as me  # noqa: E402

TINY = {"n_layers": 2, "d_model": 64, "n_heads": 8, "d_ff": 128, "vocab_size": 256, "max_seq_len": 32}
FIELDS = ("weights", "grads", "optimizer")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Per (layout, ZeRO stage): the config and every rank's measured bytes."""
    out = {}
    spec = {"model": TINY, "micro_batch": 2, "zeros": [0, 1], "static_only": True}
    for row in bench_memory.measure(["tp1", "tp2_mqa"], tmp_path_factory.mktemp("memory"), **spec):
        cfg = bench_memory.layout_config(row["layout"], micro_batch=2, model=TINY, zero=row["zero"])
        out[(row["layout"], row["zero"])] = (cfg, row["gpus"], row["ranks"])
    return out


def mismatches(cfg, gpus: int, ranks: list[dict]) -> list[str]:
    """Fields whose estimate differs from the bytes every rank holds (the estimator rounds nothing)."""
    est = me.estimate(cfg, gpus)
    got = {"weights": est.weights, "grads": est.grads, "optimizer": est.optimizer}
    bad = []
    for f in FIELDS:
        for r in ranks:
            held = r["grads_after_backward"] if f == "grads" else r[f]
            if abs(got[f] * me.GiB - held) > 0.5:
                bad.append(f"{f} rank {r['rank']}: estimate {got[f] * me.GiB:.0f} B, engine {held} B")
    return bad


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("layout", ["tp1", "tp2_mqa"])
def test_memory_estimate_static_bytes_equal_the_engine(measured, layout, zero):
    """Weights, gradients (after the boundary backward) and Adam states + fp32 masters (after a
    step) per rank, to the byte; at TP=2 each rank holds a copy of the one KV head."""
    cfg, gpus, ranks = measured[(layout, zero)]
    assert len(ranks) == cfg.engine.tensor_parallel
    assert not mismatches(cfg, gpus, ranks)
    assert all(r["optimizer"] > 0 and r["grads_after_backward"] > 0 for r in ranks)


@pytest.mark.parametrize("mutation", ["no_replicated_params", "no_kv_copies", "no_master", "no_adam_moment"])
def test_a_dropped_term_is_seen(measured, monkeypatch, mutation):
    """Mutations of the estimator: drop the replicated (norm) parameters, count the replicated KV
    head once over the TP ranks instead of once per copy, drop ZeRO-1's fp32 master or one Adam
    moment: the comparison above fails for them."""
    block_params = me.block_params
    if mutation == "no_replicated_params":
        monkeypatch.setattr(me, "block_params", lambda m, tp: (block_params(m, tp)[0], 0))
        cases, fields = [("tp1", 0), ("tp2_mqa", 1)], ("weights", "grads", "optimizer")
    elif mutation == "no_kv_copies":
        monkeypatch.setattr(me, "block_params", lambda m, tp: (block_params(m, 1)[0] // tp, block_params(m, tp)[1]))
        cases, fields = [("tp2_mqa", 0), ("tp2_mqa", 1)], ("weights", "grads", "optimizer")
    else:  # 4 bytes a parameter less: the master (ZeRO-1 fp32 keeps one) or one Adam moment
        real = me.estimate

        def estimate(cfg, gpus, name=""):
            e = real(cfg, gpus, name)
            per_param = 12 if cfg.engine.zero_stage else 8  # master + moments / moments (fp32 ZeRO-0)
            e.optimizer = e.optimizer * (per_param - 4) / per_param
            return e

        monkeypatch.setattr(me, "estimate", estimate)
        zero = 1 if mutation == "no_master" else 0
        cases, fields = [("tp1", zero), ("tp2_mqa", zero)], ("optimizer",)
    for case in cases:
        bad = mismatches(*measured[case])
        assert bad and all(any(b.startswith(f) for f in fields) for b in bad), (case, bad)


def test_launch_tables_are_the_tools_output():
    """docs/launch.md's memory tables are what `memory_estimate.py --doc` renders from the
    arguments in their markers (no typed figures; a changed estimator or config shows here)."""
    text = (ROOT / "docs/launch.md").read_text()
    assert len(me.MARKER.findall(text)) >= 3
    assert me.render_doc(text) == text, "run: python tools/memory_estimate.py --doc docs/launch.md"
    mutated = re.sub(r"\*\*[0-9.]+ GiB\*\*", "**0.0 GiB**", text, count=1)
    assert mutated != text and me.render_doc(mutated) == text  # a typed-over figure is rendered back
