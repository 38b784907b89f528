"""Sequence parallelism (engine.sequence_parallel): TP=2 + SP equals TP=1, isolation holds with SP
on, and DeepSpeed training at TP=2 + SP equals TP=2 without it (gloo, loopback; each
``scenario_*`` runs on every rank, launched by tests/support/launch.py, beside its tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.backend.distributed import init_distributed
from pipeline.config import ConfigError, load_config
from pipeline.engine.engine import build_engine, build_model, train_step
from pipeline.model.tp_state import gather_full_state_dict, load_full_state_dict
from tests.support.batches import mixed_batch
from tests.support.compare import assert_all_equivalent, assert_equivalent, mismatches
from tests.support.configs import GQA, case_config, tiny_config
from tests.support.isolation import isolation_property
from tests.support.launch import run_scenario
from tests.support.mutations import sp_mutation

CASES = {
    "gpt-neo": {"arch": "gpt-neo"},
    "llama": {"arch": "llama"},
    "llama3_gqa": GQA,
    # one KV head replicated on both TP ranks (n_kv_heads < TP), forget units on both
    "llama3_mqa_replicated": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 1}, "two_domains": False,
                              "sgtm": {"domains": [{"name": "es", "heads": [], "units": [3, 10, 31, 32, 40]}]}},
    "gpt-neo_routing": {"arch": "gpt-neo", "strategy": "gradient_routing"},
    # Mutations: the comparison below must see them.
    "mut_norm_grads_not_reduced": {"arch": "gpt-neo", "mutation": "norm_grads_not_reduced"},
    "mut_masks_batch_major": {"arch": "llama", "mutation": "masks_batch_major"},
    "mut_dq_scaled": {"arch": "llama", "mutation": "dq_scaled"},
    "mut_dq_scaled_gqa": {**GQA, "mutation": "dq_scaled"},
}
EXACT = [n for n in CASES if not n.startswith("mut_")]
TOL = dict(rtol=0, atol=1e-5)


def scenario_sequence_parallel_grads(out: Path, cases: dict[str, dict]) -> dict:
    """TP=2 + SP: loss, gathered gradients, per-token losses, logits and hidden states of a mixed
    batch per named case (arch, model/sgtm overrides, two_domains, optional mutation); and whether
    every SP-marked (replicated, sequence-sharded) parameter's gradient is the same on both ranks."""
    result = {}
    for name, over in cases.items():
        two = over.get("two_domains", True)
        cfg = case_config(over, tp=2, engine={"sequence_parallel": True})
        d = init_distributed(cfg.engine)
        with sp_mutation(over.get("mutation")):
            _, model = build_model(cfg, d)
            b = mixed_batch(n_domains=2 if two else 1)
            kw = dict(modes=b["modes"], doc_ids=b["doc_ids"], target_modes=b["target_modes"])
            loss = model(b["input_ids"], labels=b["labels"], **kw)
            loss.backward()
            with torch.no_grad():
                per_token = model(b["input_ids"], labels=b["labels"], return_per_token=True, **kw)
                logits = model(b["input_ids"], **kw)  # vocab-parallel [B, S, V/tp]
                hidden = model(b["input_ids"], doc_ids=b["doc_ids"], return_hidden=True)
        parts = [torch.empty_like(logits) for _ in range(d.tp_size)]
        dist.all_gather(parts, logits.contiguous())
        same = True
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                ref = p.grad.clone()
                dist.broadcast(ref, 0)
                same &= torch.equal(ref, p.grad)
        flags = [None] * d.world_size
        dist.all_gather_object(flags, same)
        full, grads = gather_full_state_dict(model), gather_full_state_dict(model, grads=True)
        if d.rank == 0:
            torch.save({"state": full, "grads": grads, "loss": loss.detach(), "per_token": per_token,
                        "logits": torch.cat(parts, dim=-1), "hidden": hidden}, out / f"sp_{name}.pt")
        n_sp = sum(bool(getattr(p, "sequence_parallel", False)) for p in model.parameters())
        result[name] = {"sp_grads_equal_on_ranks": flags, "sp_marked": n_sp}
    return result


@pytest.fixture(scope="module")
def sp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp2")
    return out, run_scenario(2, scenario_sequence_parallel_grads, out, cases=CASES)


def _tp1(world, name: str, saved: dict):
    """The TP=1 model (no SP) with the TP=2 + SP run's weights, run on the same batch."""
    over = CASES[name]
    two = over.get("two_domains", True)
    cfg = case_config(over, tp=1)
    _, model = build_model(cfg, world)
    load_full_state_dict(model, saved["state"])
    b = mixed_batch(n_domains=2 if two else 1)
    kw = dict(modes=b["modes"], doc_ids=b["doc_ids"], target_modes=b["target_modes"])
    loss = model(b["input_ids"], labels=b["labels"], **kw)
    loss.backward()
    with torch.no_grad():
        extra = {"per_token": model(b["input_ids"], labels=b["labels"], return_per_token=True, **kw),
                 "logits": model(b["input_ids"], **kw),
                 "hidden": model(b["input_ids"], doc_ids=b["doc_ids"], return_hidden=True)}
    return model, loss.detach(), extra


@pytest.mark.parametrize("name", EXACT)
def test_tp2_sp_loss_and_gradients_equal_tp1(single_process_world, sp2, name):
    """Mixed modes (changes inside documents, target_modes): loss and every gathered gradient,
    per-token losses, logits and the gathered final hidden states equal TP=1's, per tensor
    relative to its scale (tests/support/compare.py); SP-marked parameters (norms, row-parallel output
    biases) hold the same gradient on both ranks."""
    out, result = sp2
    saved = torch.load(out / f"sp_{name}.pt", weights_only=True)
    model, loss, extra = _tp1(single_process_world, name, saved)
    assert_equivalent(saved["loss"], loss, "loss")
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(saved["grads"]) == set(grads)
    assert_all_equivalent(saved["grads"], grads)
    assert_all_equivalent(saved, extra, names=("per_token", "logits", "hidden"))
    assert result[name]["sp_grads_equal_on_ranks"] == [True, True]
    n_norms = sum(1 for n, _ in model.named_parameters() if "norm" in n)
    assert result[name]["sp_marked"] >= n_norms > 0


def _grad_mismatches(single_process_world, sp2, name: str) -> list[str]:
    """The tensors whose gradient fails the comparison above (tests/support/compare.py's lines)."""
    out, _ = sp2
    saved = torch.load(out / f"sp_{name}.pt", weights_only=True)
    model, _, _ = _tp1(single_process_world, name, saved)
    return mismatches(saved["grads"], {n: p.grad for n, p in model.named_parameters()})


def test_mutation_unreduced_norm_gradients_is_caught(single_process_world, sp2):
    """Without the all-reduce, norm gains/biases keep per-rank partial gradients: the TP=1
    comparison and the same-on-every-rank check both fail, and only on SP-marked parameters."""
    bad = [line.split(":")[0] for line in _grad_mismatches(single_process_world, sp2, "mut_norm_grads_not_reduced")]
    assert bad and all("norm" in n or n.endswith("out.bias") or n.endswith("fc2.bias") for n in bad), bad
    assert any("norm" in n for n in bad)
    assert sp2[1]["mut_norm_grads_not_reduced"]["sp_grads_equal_on_ranks"] != [True, True]


def test_mutation_masks_in_batch_major_order_is_caught(single_process_world, sp2):
    """Per-token masks flattened [B, S] while the activations are [S, B]: gradients differ."""
    assert _grad_mismatches(single_process_world, sp2, "mut_masks_batch_major")


@pytest.mark.parametrize("name", ["mut_dq_scaled", "mut_dq_scaled_gqa"])
def test_sp_gradient_comparison_fails_with_dq_scaled_by_1_05(single_process_world, sp2, name):
    """Mutation: the gradient into the query projection scaled by 1.05 on both ranks at TP=2 + SP
    (llama with RoPE; GQA). The loss, logits and hidden states are untouched; the gradient
    comparison of test_tp2_sp_loss_and_gradients_equal_tp1 fails, on every block's QKV weight."""
    out, _ = sp2
    saved = torch.load(out / f"sp_{name}.pt", weights_only=True)
    model, loss, extra = _tp1(single_process_world, name, saved)
    assert_equivalent(saved["loss"], loss, "loss")
    assert_all_equivalent(saved, extra, names=("per_token", "logits", "hidden"))
    grads = {n: p.grad for n, p in model.named_parameters()}
    with pytest.raises(AssertionError, match=r"blocks\.0\.attn\.qkv\.weight: \d+/\d+ elements differ"):
        assert_all_equivalent(saved["grads"], grads)
    bad = {line.split(":")[0] for line in mismatches(saved["grads"], grads)}
    assert {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"} <= bad, bad


def scenario_sequence_parallel_isolation(out: Path, seeds: list[int], mutation_seeds: list[int]) -> dict:
    """The isolation property at TP=2 + SP over ``seeds``, then over ``mutation_seeds`` with the
    token masks in the wrong ([B, S]) order, which the check must report (one launch for both)."""
    clean = isolation_property(seeds, sequence_parallel=True)
    with sp_mutation("masks_batch_major"):
        mutated = isolation_property(mutation_seeds, sequence_parallel=True)
    return {"clean": clean, "mutated": mutated}


def test_isolation_property_at_tp2_with_sp(tmp_path):
    """The random-case isolation property (tests/support/isolation.py) at TP=2 with SP on: every
    shard's retain and joint(non_forget) gradients bit-identical under changed forget content,
    forget slices changed. With the masks flattened in the wrong order the same check reports leaks."""
    result = run_scenario(2, scenario_sequence_parallel_isolation, tmp_path, seeds=list(range(20)),
                          mutation_seeds=[0, 1, 2])
    clean, mutated = result["clean"], result["mutated"]
    assert clean["checked"] == 20 and clean["reached"] > 8
    assert not clean["failures"], clean["failures"][:3]
    assert mutated["checked"] == 3 and any("leaked" in f for f in mutated["failures"])


def scenario_sequence_parallel_engine(out: Path, archs: list[str], steps: int) -> dict:
    """DeepSpeed ZeRO-1 at TP=2, with and without SP, per-partition clipping that binds: losses and
    the clip norms of every step, on the same mixed-mode batches."""
    result = {}
    for arch in archs:
        over = {"model": {"n_heads": 8, "n_kv_heads": 2},
                "sgtm": {"domains": [{"name": "es", "heads": [4, 5, 6, 7], "units": [3, 10, 31, 32, 40]}]},
                "two_domains": False} if arch == "llama3" else {}
        for sp in (False, True):
            cfg = tiny_config(arch, "sgtm", tp=2, two_domains=over.get("two_domains", True),
                              model=over.get("model", {}), sgtm=over.get("sgtm", {}),
                              engine={"zero_stage": 1, "micro_batch_size": 4, "grad_clip": 0.05,
                                      "sequence_parallel": sp},
                              optimizer={"lr": 3e-3}, train={"steps": steps})
            state = build_engine(cfg)
            losses, norms = [], []
            for step in range(steps):
                b = mixed_batch(seed=step, batch=4, n_domains=2 if over.get("two_domains", True) else 1)
                losses.append(float(train_step(state, [b])))
                norms.append(state.clipper.last_norms.tolist())
            result[f"{arch}_sp{int(sp)}"] = {"losses": losses, "norms": norms}
    return result


def test_deepspeed_tp2_sp_losses_equal_tp2(tmp_path):
    """4 ZeRO-1 steps with binding per-partition clipping on mixed-mode batches: TP=2 + SP gives
    the losses and clip norms of TP=2 without SP (so the clipper counts the all-reduced norm
    gradients once, as before)."""
    result = run_scenario(2, scenario_sequence_parallel_engine, tmp_path, archs=["gpt-neo", "llama3"], steps=4)
    for arch in ("gpt-neo", "llama3"):
        base, sp = result[f"{arch}_sp0"], result[f"{arch}_sp1"]
        torch.testing.assert_close(torch.tensor(sp["losses"]), torch.tensor(base["losses"]), **TOL)
        torch.testing.assert_close(torch.tensor(sp["norms"]), torch.tensor(base["norms"]), rtol=1e-5, atol=1e-7)
        assert all(n > 0.05 for row in base["norms"] for n in row if n > 0)  # the clip binds
        assert len(set(base["losses"])) == 4


@pytest.mark.parametrize("engine,model,match", [
    ({"tensor_parallel": 1, "sequence_parallel": True}, {},
     r"^engine.sequence_parallel: needs engine.tensor_parallel > 1"),
    ({"tensor_parallel": 2, "sequence_parallel": True}, {"max_seq_len": 15},
     r"^engine.sequence_parallel: model.max_seq_len=15 is not divisible by engine.tensor_parallel=2"),
])
def test_invalid_sequence_parallel_is_a_one_line_error(engine, model, match):
    data = {"model": {"arch": "gpt-neo", "n_heads": 4, "d_model": 32, "d_ff": 64, **model},
            "sgtm": {"domains": [{"name": "es", "heads": 1, "units": 2}]}, "engine": engine}
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [], data=data)
    assert "\n" not in str(e.value)
