"""Multi-process checks through megatron TP and the DeepSpeed engine (gloo, loopback).

Each ``scenario_*`` function runs on every rank (tests/support/launch.py ``run_scenario``) and sits
beside the tests that assert on what it returns and saves."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.backend.distributed import init_distributed
from pipeline.codes import Mode
from pipeline.engine.engine import build_engine, build_model, train_step
from pipeline.model.ablate import ablate
from pipeline.model.tp_state import gather_full_state_dict, load_full_state_dict
from tests.support.batches import dp_share, global_batch, isolation_batch, mixed_batch
from tests.support.compare import assert_all_equivalent, assert_equivalent, mismatches
from tests.support.configs import tiny_config
from tests.support.isolation import isolation_property, slice_changes
from tests.support.launch import run_scenario
from tests.support.mutations import scaled_query_grad

ARCHS = ["gpt-neo", "llama"]


def scenario_tp_grads(out: Path, archs: list[str], dq_scaled: list[str] = ()) -> dict:
    """TP=2 loss and gathered gradients for a mixed batch, per arch; then ablation per shard. For
    the archs in ``dq_scaled`` also a run with dQ scaled by 1.05 (``tp2_{arch}_dq_scaled.pt``)."""
    result = {}
    for arch, fault in [(a, None) for a in archs] + [(a, "dq_scaled") for a in dq_scaled]:
        cfg = tiny_config(arch, "sgtm", tp=2)
        d = init_distributed(cfg.engine)
        part, model = build_model(cfg, d)
        batch = mixed_batch()
        with scaled_query_grad() if fault else contextlib.nullcontext():
            loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"],
                         doc_ids=batch["doc_ids"], target_modes=batch["target_modes"])
            loss.backward()
        if fault:
            state, grads = gather_full_state_dict(model), gather_full_state_dict(model, grads=True)
            if d.rank == 0:
                torch.save({"state": state, "grads": grads, "loss": loss.detach()}, out / f"tp2_{arch}_{fault}.pt")
            continue
        full = gather_full_state_dict(model)
        full_grads = gather_full_state_dict(model, grads=True)
        # Ablation on this shard: forget[es] slices zero, everything else untouched.
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ablate(model, [0])
        local_ok = True
        for n, p in model.named_parameters():
            sel = p.sgtm_role.slice_mask(p, {0}).expand_as(p)
            local_ok &= bool((p[sel] == 0).all()) and torch.equal(p[~sel], before[n][~sel])
        ablated_full = gather_full_state_dict(model)
        owned = [None] * d.world_size
        dist.all_gather_object(owned, part.owned(d.tp_rank))
        if d.rank == 0:
            torch.save({"state": full, "grads": full_grads, "loss": loss.detach(), "ablated": ablated_full},
                       out / f"tp2_{arch}.pt")
        flags = [None] * d.world_size
        dist.all_gather_object(flags, local_ok)
        result[arch] = {"owned": owned, "ablation_local_ok": flags}
    return result


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    return out, run_scenario(2, scenario_tp_grads, out, archs=ARCHS, dq_scaled=ARCHS)


def _tp1(world, arch: str, saved: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the TP=1 model with the TP=2 run's weights, on the same batch."""
    _, model = build_model(tiny_config(arch, "sgtm", tp=1), world)
    load_full_state_dict(model, saved["state"])
    batch = mixed_batch()
    loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                 target_modes=batch["target_modes"])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_loss_and_gradients_equal_tp1(single_process_world, tp2, arch):
    """Loss and every gathered gradient equal TP=1's, per tensor relative to its scale
    (tests/support/compare.py)."""
    out, result = tp2
    saved = torch.load(out / f"tp2_{arch}.pt", weights_only=True)
    loss, grads = _tp1(single_process_world, arch, saved)
    assert_equivalent(saved["loss"], loss, "loss")
    assert set(saved["grads"]) == set(grads)
    assert_all_equivalent(saved["grads"], grads)
    # The partition really is uneven across ranks: forget[es] heads on rank 0 only, forget[fr]
    # heads on rank 1 only, forget[es] units on both.
    owned = result[arch]["owned"]
    assert owned[0]["es"]["0"]["heads"] == [1] and owned[1]["es"]["0"]["heads"] == []
    assert owned[0]["fr"]["0"]["heads"] == [] and owned[1]["fr"]["0"]["heads"] == [2]
    assert owned[0]["es"]["0"]["units"] == [3, 10, 31] and owned[1]["es"]["0"]["units"] == [32, 40]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_gradient_comparison_fails_with_dq_scaled_by_1_05(single_process_world, tp2, arch):
    """Mutation: the gradient into the query projection scaled by 1.05 on both TP ranks (what a
    wrong score scale or RoPE backward under TP would do). The loss is untouched; the gradient
    comparison of the test above fails, on every block's QKV weight."""
    out, _ = tp2
    saved = torch.load(out / f"tp2_{arch}_dq_scaled.pt", weights_only=True)
    loss, grads = _tp1(single_process_world, arch, saved)
    assert_equivalent(saved["loss"], loss, "loss")
    with pytest.raises(AssertionError, match=r"blocks\.0\.attn\.qkv\.weight: \d+/\d+ elements differ"):
        assert_all_equivalent(saved["grads"], grads)
    bad = {line.split(":")[0] for line in mismatches(saved["grads"], grads)}
    assert {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"} <= bad, bad


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_per_shard_matches_tp1(single_process_world, tp2, arch):
    out, result = tp2
    assert result[arch]["ablation_local_ok"] == [True, True]
    saved = torch.load(out / f"tp2_{arch}.pt", weights_only=True)
    cfg = tiny_config(arch, "sgtm", tp=1)
    _, model = build_model(cfg, single_process_world)
    load_full_state_dict(model, saved["state"])
    ablate(model, [0])
    for name, p in model.named_parameters():
        assert torch.equal(saved["ablated"][name], p.detach()), name


def scenario_isolation_property(out: Path, seeds: list[int]) -> dict:
    """The isolation property at TP=2 over the random cases of ``seeds`` (tests/support/isolation.py)."""
    return isolation_property(seeds)


def test_isolation_property_at_tp2(tmp_path):
    """The random-case isolation property (tests/support/isolation.py) on two TP ranks: forget
    heads/units on one rank, on both, or on none; every shard's retain and joint(non_forget)
    gradients bit-identical under changed forget content, forget slices changed somewhere."""
    result = run_scenario(2, scenario_isolation_property, tmp_path, seeds=list(range(40)))
    assert result["checked"] == 40 and result["reached"] > 20
    assert not result["failures"], result["failures"][:3]


CLIP = {"grad_clip": 0.05}  # binds every group at this size (checked below)


def scenario_isolation(out: Path, runs: list[dict], steps: int) -> dict:
    """Per run (arch, engine overrides, sgtm overrides): three DeepSpeed runs at TP=2 that differ
    only in the forget spans inside the documents (A, B: other content; C: B's content unlabelled)."""
    result = {}
    for run in runs:
        finals = {}
        for name, seed, mode in (("A", 1, Mode.FORGET), ("B", 2, Mode.FORGET), ("C", 2, Mode.UNLABELLED)):
            cfg = tiny_config(run["arch"], "sgtm", tp=2,
                              engine={"zero_stage": 1, "micro_batch_size": 4, **run.get("engine", {})},
                              sgtm=run.get("sgtm", {}), optimizer={"lr": 3e-3, "weight_decay": 0.1},
                              train={"steps": steps})
            state = build_engine(cfg)
            for step in range(steps):
                train_step(state, [isolation_batch(step, seed, mode)])
            finals[name] = gather_full_state_dict(state.model)
            if state.clipper is not None and state.clipper.last_norms is not None:
                finals[name + "_norms"] = state.clipper.last_norms.clone()
        if dist.get_rank() == 0:
            torch.save({"finals": finals}, out / f"isolation_{run['name']}.pt")
        result[run["name"]] = "saved"
    return result


def _isolation_leaks(single_process_world, tmp_path_factory, run: dict, steps: int = 20):
    """(retain/joint(non_forget) slices that differ between runs A and B, forget slices that
    differ, retain slices that differ between A and the unlabelled control C, clip norms of A)."""
    out = tmp_path_factory.mktemp(f"iso_{run['name']}")
    run_scenario(2, scenario_isolation, out, runs=[run], steps=steps)
    saved = torch.load(out / f"isolation_{run['name']}.pt", weights_only=True)
    A, B, C = (saved["finals"][k] for k in "ABC")
    cfg = tiny_config(run["arch"], "sgtm", tp=1, sgtm=run.get("sgtm", {}))
    _, full_model = build_model(cfg, single_process_world)  # roles of full tensors
    leaked, forget_changed, retain_changed_c = slice_changes(full_model, A, B, C)
    return leaked, forget_changed, retain_changed_c, saved["finals"].get("A_norms")


@pytest.mark.parametrize("arch,zero", [("gpt-neo", 1), ("llama", 2)])
def test_isolation_invariant_through_deepspeed(single_process_world, tmp_path_factory, arch, zero):
    """20 steps at TP=2 with binding per-partition clipping, documents whose mode changes inside
    them (retain-mode text around forget spans): changing the forget spans' content leaves every
    retain and joint(non_forget) parameter bit-identical (forget parameters differ); making those
    spans unlabelled does change retain parameters (the comparison can see a difference)."""
    run = {"name": f"{arch}_zero{zero}", "arch": arch, "engine": {"zero_stage": zero, **CLIP}}
    leaked, forget_changed, retain_changed_c, norms = _isolation_leaks(single_process_world, tmp_path_factory, run)
    assert not leaked, f"retain/joint slices changed with forget content: {leaked}"
    assert forget_changed > 0
    assert retain_changed_c > 0
    assert norms is not None and bool((norms[norms > 0] > CLIP["grad_clip"]).all())  # the clip bound


def test_joint_all_embeddings_have_their_own_clip_group(single_process_world, tmp_path_factory):
    """Embeddings updated by every token (embedding_update: all), ZeRO-2, binding clipping: after
    one step the retain slices are bit-identical whatever the forget content, because the
    embeddings' (forget-dependent) norm no longer sets the retain group's clip coefficient. (From
    the second step on, retain gradients read the changed embeddings: a model whose joint
    parameters learn from forget data is not isolated over several steps, by construction.)"""
    run = {"name": "joint_all", "arch": "gpt-neo", "engine": {"zero_stage": 2, **CLIP},
           "sgtm": {"embedding_update": "all"}}
    leaked, forget_changed, _, _ = _isolation_leaks(single_process_world, tmp_path_factory, run, steps=1)
    assert not leaked, leaked
    assert forget_changed > 0


def test_isolation_breaks_with_global_clipping(single_process_world, tmp_path_factory):
    """The multi-step check can fail: global clipping (one norm over every group) leaks."""
    run = {"name": "global", "arch": "gpt-neo", "engine": {**CLIP, "clip_mode": "global"}}
    leaked, _, _, _ = _isolation_leaks(single_process_world, tmp_path_factory, run)
    assert leaked


def scenario_zero_losses(out: Path, runs: list[dict], steps: int, engine: dict | None = None) -> dict:
    """Losses of masked steps for each (tp, zero) run on the same global batches."""
    result = {}
    for run in runs:
        cfg = tiny_config("gpt-neo", "sgtm", tp=run["tp"],
                          engine={"zero_stage": run["zero"], "micro_batch_size": 4 // (dist_world() // run["tp"]),
                                  **(engine or {})},
                          optimizer={"lr": 3e-3}, train={"steps": steps})
        state = build_engine(cfg)
        dp_rank, dp_size = state.dist.dp_rank, state.dist.dp_size
        losses = []
        for step in range(steps):
            losses.append(float(train_step(state, dp_share(global_batch(step), dp_rank, dp_size))))
        result[f"tp{run['tp']}_dp{dp_size}_zero{run['zero']}"] = losses
    return result


def dist_world() -> int:
    return int(os.environ["WORLD_SIZE"])


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["noclip", "per_partition_clip"])
def test_zero_stages_and_tp2xdp2_give_same_losses(single_process_world, tmp_path_factory, clip):
    """5 masked steps: ZeRO 0/1/2 at TP=2, DP=2 at ZeRO-2 and TP2xDP2 (4 processes) match one
    process at ZeRO-0, also with per-partition clipping that binds (which exercises each
    engine's gradient layout)."""
    steps = 5
    out = tmp_path_factory.mktemp("zero")
    engine = {"grad_clip": clip}
    two = run_scenario(2, scenario_zero_losses, out / "two", steps=steps, engine=engine,
                      runs=[{"tp": 2, "zero": 0}, {"tp": 2, "zero": 1}, {"tp": 2, "zero": 2}, {"tp": 1, "zero": 2}])
    four = run_scenario(4, scenario_zero_losses, out / "four", steps=steps, engine=engine,
                        runs=[{"tp": 2, "zero": 1}, {"tp": 2, "zero": 2}])
    # Baseline: one process, TP=1, ZeRO-0, the same global batches.
    cfg = tiny_config("gpt-neo", "sgtm", tp=1, engine={"zero_stage": 0, "micro_batch_size": 4, **engine},
                      optimizer={"lr": 3e-3}, train={"steps": steps})
    state = build_engine(cfg)
    base = [float(train_step(state, [global_batch(s)])) for s in range(steps)]
    runs = {**two, **four}
    assert set(runs) == {"tp2_dp1_zero0", "tp2_dp1_zero1", "tp2_dp1_zero2", "tp1_dp2_zero2",
                         "tp2_dp2_zero1", "tp2_dp2_zero2"}
    for name, losses in runs.items():
        assert losses == pytest.approx(base, abs=1e-5), name
    assert base[-1] < base[0]  # it trains
    if clip:
        norms = state.clipper.last_norms
        assert norms is not None and bool((norms > clip).all())  # the clip really bound every group
