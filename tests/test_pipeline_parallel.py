"""Pipeline parallelism inside DeepSpeed (engine.pipeline_parallel): PP=2, PP=2 x TP=2 and
PP=2 x DP=2 train exactly as PP=1; checkpoint + resume at PP=2 through `sgtm train`'s loop
continues exactly; the isolation invariant holds through PP=2 x TP=2 with GQA and SP and binding
per-partition clipping; ablation zeroes exactly the forget slices on every stage and shard.

The multi-process tests share two launches (2 and 4 gloo ranks, ``scenario_all`` below) and are
marked ``parallel`` (`make test-parallel`); the config and layout checks are plain tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.config import ConfigError
from pipeline.engine.engine import build_engine, build_model, train_step
from pipeline.model.ablate import ablate
from pipeline.model.tp_state import load_full_state_dict
from tests.support.batches import dp_share, global_batch, isolation_batch, mixed_batch
from tests.support.compare import assert_equivalent
from tests.support.configs import layout_config
from tests.support.data import data_cfg, resume_corpus
from tests.support.isolation import slice_changes
from tests.support.launch import run_scenario
from tests.support.mutations import pipeline_mutation

STEPS = 5
CLIP = 0.05  # binds every clip group at this size (asserted)
TOL = dict(rel=0, abs=1e-5)
RUNS2 = [{"name": "pp2", "pp": 2, "clip": CLIP, "gas": 2},
         {"name": "pp2_bf16", "pp": 2, "clip": CLIP, "precision": "bf16"}]
RUNS4 = [{"name": "pp2_tp2", "pp": 2, "tp": 2, "clip": CLIP, "gas": 2},
         {"name": "pp2_dp2", "pp": 2, "zero": 0, "clip": CLIP},
         {"name": "pp2_tp2_gqa_sp", "arch": "llama3", "pp": 2, "tp": 2, "sp": True, "clip": CLIP},
         # Mutation: clip norms summed over the stage only, not over the pipeline group.
         {"name": "mut_clip_no_pipeline_reduce", "pp": 2, "tp": 2, "clip": CLIP, "gas": 2,
          "mutation": "clip_no_pipeline_reduce"}]
CLIP_NF = 0.5  # the non-finite scenario's clip


# ---------------------------------------------------------------------------------- scenarios
# Run on every rank by tests/support/launch.py (two launches: ``two`` and ``four`` below).


def scenario_losses(out: Path, runs: list[dict], steps: int) -> dict:
    """Losses (and last clip norms) of ``steps`` masked steps with mixed modes per run, on the same
    global batches, each DP rank its share."""
    result = {}
    for run in runs:
        with pipeline_mutation(run.get("mutation")):
            cfg = layout_config(run, steps)
            state = build_engine(cfg)
            d = state.dist
            n_domains = len(cfg.sgtm.domains)
            losses = [float(train_step(state, dp_share(global_batch(s, n_domains), d.dp_rank, d.dp_size,
                                                       run.get("gas", 1)))) for s in range(steps)]
        norms = state.clipper.last_norms.tolist() if state.clipper is not None else None
        result[run["name"]] = {"losses": losses, "norms": norms, "stage_layers": list(state.model.stage_layers)}
    return result


def scenario_isolation(out: Path, steps: int, mutated_steps: int) -> dict:
    """PP=2 x TP=2, GQA, SP, binding per-partition clipping: runs A and B differ only in the
    content of forget spans (C: B's spans unlabelled), ``steps`` each; then A and B again with the
    modes dropped on stage 1 for ``mutated_steps``. Rank 0 saves the gathered final weights."""
    from pipeline.codes import Mode
    from pipeline.engine.pipe import gather_pipeline_state_dict

    run = {"arch": "llama3", "pp": 2, "tp": 2, "sp": True, "clip": 0.05}
    finals = {}
    plan = [("A", 1, Mode.FORGET, steps, None), ("B", 2, Mode.FORGET, steps, None),
            ("C", 2, Mode.UNLABELLED, steps, None),
            ("mutA", 1, Mode.FORGET, mutated_steps, "modes_dropped_on_stage1"),
            ("mutB", 2, Mode.FORGET, mutated_steps, "modes_dropped_on_stage1")]
    for name, seed, mode, n, mut in plan:
        with pipeline_mutation(mut):
            state = build_engine(layout_config(run, n))
            for step in range(n):
                train_step(state, [isolation_batch(step, seed, mode)])
        finals[name] = gather_pipeline_state_dict(state.model)
        finals[name + "_norms"] = state.clipper.last_norms.clone()
    if dist.get_rank() == 0:
        torch.save(finals, out / "isolation.pt")
    return {"saved": sorted(finals)}


def scenario_ablation(out: Path) -> dict:
    """PP=2 x TP=2, GQA: held-out per-token losses full and ablated through the pipeline engine
    (``sgtm train``'s evaluation), then ``ablate`` on every stage and shard: on each rank the forget
    slices are zero and nothing else changed; rank 0 saves the gathered weights before and after."""
    from pipeline.engine.pipe import evaluate, gather_pipeline_state_dict, per_token_losses
    from pipeline.model.ablate import ablate

    state = build_engine(layout_config({"arch": "llama3", "pp": 2, "tp": 2}, 1))
    batches = [mixed_batch(seed=s, batch=3, n_domains=1) for s in (7, 8)]  # not the training shape
    full, abl = per_token_losses(state, batches, None), per_token_losses(state, batches, [0])
    results = evaluate(state, {"forget": batches}, [0])
    before = gather_pipeline_state_dict(state.model)
    local_before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    ablate(state.model, [0])
    ok, n_forget = True, 0
    for n, p in state.model.named_parameters():
        sel = p.sgtm_role.slice_mask(p, {0}).expand_as(p)
        n_forget += int(sel.sum())
        ok &= bool((p[sel] == 0).all()) and torch.equal(p[~sel], local_before[n][~sel])
    after = gather_pipeline_state_dict(state.model)
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, {"ok": ok, "forget_elements": n_forget, "stage": state.dist.pp_rank,
                                   "tp_rank": state.dist.tp_rank})
    if dist.get_rank() == 0:
        torch.save({"before": before, "after": after, "full": full, "ablated": abl, "batches": batches},
                   out / "ablation.pt")
    r = results["forget"]
    return {"ranks": flags, "eval": {"full": r.full, "ablated": r.ablated, "tokens": r.tokens}}


def scenario_train_resume(out: Path, config: dict, steps: int, stop_at: int) -> dict:
    """``sgtm train``'s loop at PP=2: run A straight to ``steps``; run B stops after ``stop_at``
    steps (checkpoint), then ``--resume`` to ``steps``. Both runs' metrics and final eval."""
    from pipeline.config import load_config
    from pipeline.train import loop

    runs = {}
    for name in ("A", "B"):
        cfg = dict(config, run_dir=str(out / "train_resume" / name))
        if name == "A":
            loop.train(load_config(data=cfg))
        else:
            loop.train(load_config(data=cfg), max_steps=stop_at)
            loop.train(load_config(data=cfg), resume=True)
        dist.barrier()
        if dist.get_rank() == 0:
            run_dir = out / "train_resume" / name
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(x) for x in lines]
            runs[name] = {"train": [r for r in records if r.get("kind") == "train"],
                          "final": json.loads((run_dir / "final.json").read_text()),
                          "tags": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}
    return runs


def scenario_nonfinite(out: Path, zero: int) -> dict:
    """PP=2 with per-partition clipping: step 2's loss is NaN on the last stage (``nan_loss@2``);
    every rank of both stages must report the step skipped and keep its weights, then step 3
    trains again."""
    from pipeline.components import faults

    state = build_engine(layout_config({"pp": 2, "zero": zero, "clip": CLIP_NF, "gas": 2}, 3))
    n_domains = len(state.cfg.sgtm.domains)
    flags, changed = [], []
    os.environ[faults.ENV] = "nan_loss@2"
    try:
        for step in (1, 2, 3):
            before = [p.detach().clone() for p in state.model.parameters()]
            train_step(state, dp_share(global_batch(step, n_domains), 0, 1, 2), step=step)
            flags.append(state.last_step_finite)
            changed.append(any(not torch.equal(b, p) for b, p in zip(before, state.model.parameters())))
    finally:
        del os.environ[faults.ENV]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"finite": flags, "changed": changed, "stage": state.dist.pp_rank,
                                      "lr": state.engine.get_lr()[0]})
    return everyone


def scenario_all(out: Path, **parts: dict) -> dict:
    """Several scenarios in one launch (DeepSpeed's start-up paid once per world size): ``parts``
    maps ``name[-label]`` to the keyword arguments of ``scenario_<name>``."""
    return {name: globals()[f"scenario_{name.split('-')[0]}"](out, **kwargs) for name, kwargs in parts.items()}


def _launch(nprocs: int, out: Path, **parts) -> dict:
    return run_scenario(nprocs, scenario_all, out, timeout=1200, **parts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """tests/support/data.py ``resume_corpus``: 120 stories per language in small shards."""
    return resume_corpus(tmp_path_factory.mktemp("resume_corpus"))


def _train_config(root: Path) -> dict:
    return {
        "name": "pp_resume",
        "model": {"arch": "llama", "n_layers": 4, "d_model": 32, "n_heads": 4, "d_ff": 64, "vocab_size": 512,
                  "max_seq_len": 32},
        "sgtm": {"strategy": "sgtm", "domains": [{"name": "spanish", "heads": [1], "units": [3, 10, 31, 32, 40]}]},
        "engine": {"pipeline_parallel": 2, "zero_stage": 1, "micro_batch_size": 2, "grad_accum_steps": 2,
                   "grad_clip": 0.5},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "warmup_steps": 2},
        "train": {"steps": 6, "seed": 11, "log_every": 1},
        "eval": {"every": 0, "batches": 2, "batch_size": 3, "calibrate": False},
        "checkpoint": {"every": 0, "keep": 2},
        "data": data_cfg(root, epochs=3, shuffle_buffer=8),
    }


@pytest.fixture(scope="module")
def two(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("pp_two")
    return out, _launch(2, out, losses={"runs": RUNS2, "steps": STEPS},
                        train_resume={"config": _train_config(corpus), "steps": 6, "stop_at": 3},
                        **{"nonfinite-zero1": {"zero": 1}, "nonfinite-zero0": {"zero": 0}})


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_four")
    return out, _launch(4, out, losses={"runs": RUNS4, "steps": STEPS},
                        isolation={"steps": 20, "mutated_steps": 2}, ablation={})


def _pp1(single_process_world, run: dict) -> tuple[list[float], list[float]]:
    """Losses and last clip norms of the same run at PP=1, TP=1 (one process, same global batches)."""
    cfg = layout_config({**run, "pp": 1, "tp": 1, "sp": False, "mutation": None}, STEPS)
    state = build_engine(cfg)
    n = len(cfg.sgtm.domains)
    losses = [float(train_step(state, dp_share(global_batch(s, n), 0, 1, run.get("gas", 1)))) for s in range(STEPS)]
    return losses, state.clipper.last_norms.tolist()


def _differs(got: dict, losses: list[float], norms: list[float]) -> bool:
    return got["losses"] != pytest.approx(losses, **TOL) or got["norms"] != pytest.approx(norms, rel=1e-5)


# ---------------------------------------------------------------------------------- plain checks


@pytest.mark.parametrize("overrides,message", [
    (["engine.pipeline_parallel=3"], "engine.pipeline_parallel: 3 does not divide model.n_layers=4"),
    (["engine.pipeline_parallel=2", "engine.zero_stage=2"], "engine.zero_stage: DeepSpeed's pipeline engine"),
    (["engine.pipeline_parallel=2", "model.arch=gpt-neo"], "model.tie_embeddings: tied embeddings"),
    (["engine.pipeline_parallel=2", "eval.calibrate=true"], "eval.calibrate: logit calibration"),
    (["engine.pipeline_parallel=0"], "engine.pipeline_parallel: must be positive"),
])
def test_bad_pipeline_configs_are_one_line_errors(overrides, message):
    from pipeline.config import load_config

    base = ["model.arch=llama", "model.n_layers=4", "eval.calibrate=false"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_world_not_divisible_by_tp_times_pp_is_one_line(single_process_world):
    from pipeline.backend.distributed import init_distributed
    from pipeline.config import EngineConfig

    with pytest.raises(ValueError, match=r"^engine.pipeline_parallel: the world size 1 is not divisible by "
                                         r"engine.tensor_parallel x engine.pipeline_parallel = 1 x 2$"):
        init_distributed(EngineConfig(pipeline_parallel=2))


def test_partition_prints_which_stage_and_tp_rank_owns_what(tmp_path, capsys):
    """`sgtm partition` at PP=2 x TP=2 with GQA: each (stage, TP rank) line names its blocks and
    the forget KV groups (query heads) and units it owns; the JSON has the same layout."""
    from pipeline.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {arch: llama3, n_layers: 4, d_model: 32, n_heads: 8, n_kv_heads: 2, d_ff: 64}\n"
                   "sgtm: {domains: [{name: es, heads: [4, 5, 6, 7], units: [3, 40], layers: [1, 2]}]}\n"
                   "engine: {tensor_parallel: 2, pipeline_parallel: 2}\neval: {calibrate: false}\n")
    assert main(["partition", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "stage 0 (blocks 0-1, embeddings) TP rank 1: es: KV groups [1] (query heads [4, 5, 6, 7]) in " \
           "blocks [1], 1 (unit, block) pairs" in text, text
    assert "stage 0 (blocks 0-1, embeddings) TP rank 0: es: no heads, 1 (unit, block) pairs" in text, text
    assert "stage 1 (blocks 2-3, final norm + LM head + loss) TP rank 1: es: KV groups [1]" in text, text
    assert main(["partition", "--config", str(cfg), "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [s["blocks"] for s in stages] == [[0, 1], [2, 3]]
    assert stages[1]["owned"]["1"]["es"] == {"2": {"heads": [4, 5, 6, 7], "units": [40]}}


def test_a_stage_builds_only_its_blocks_with_pp1_weights(single_process_world):
    """A stage's model (keep_blocks) holds PP=1's weights for its blocks, the embeddings and the
    head, placeholders without parameters for the other blocks, and leaves the RNG where the whole
    model's construction leaves it (the other blocks were built, then dropped)."""
    from pipeline.model.transformer import RemoteBlock

    cfg = layout_config({"arch": "llama3"}, 1)
    _, whole = build_model(cfg, single_process_world)
    rng_whole = torch.get_rng_state()
    _, stage = build_model(cfg, single_process_world, keep_blocks=range(2, 4))
    assert torch.equal(torch.get_rng_state(), rng_whole)
    assert [type(b) is RemoteBlock for b in stage.blocks] == [True, True, False, False]
    ref = dict(whole.named_parameters())
    names = [n for n, _ in stage.named_parameters()]
    assert set(names) == {n for n in ref if not n.startswith(("blocks.0.", "blocks.1."))}
    for n, p in stage.named_parameters():
        assert torch.equal(p, ref[n]), n


# ------------------------------------------------------------------------------ multi-process


@pytest.mark.parallel
@pytest.mark.parametrize("run", RUNS2, ids=lambda r: r["name"])
def test_pp2_losses_equal_pp1(single_process_world, two, run):
    """5 masked steps, mixed modes, binding per-partition clipping (fp32 with 2 micro-batches a
    step; bf16 ZeRO-1): PP=2 gives PP=1's losses (1e-5) and clip norms."""
    got = two[1]["losses"][run["name"]]
    assert got["stage_layers"] == [0, 1, 2]  # embeddings + blocks 0-1 on stage 0 (rank 0)
    losses, norms = _pp1(single_process_world, run)
    assert not _differs(got, losses, norms), (got, losses, norms)
    assert all(n > CLIP for n in norms) and losses[-1] != losses[0]


@pytest.mark.parallel
@pytest.mark.parametrize("name", ["pp2_tp2", "pp2_dp2", "pp2_tp2_gqa_sp"])
def test_pp2_x_tp2_and_pp2_x_dp2_losses_equal_pp1(single_process_world, four, name):
    """4 processes: PP=2 x TP=2 (ZeRO-1, 2 micro-batches), PP=2 x DP=2 (ZeRO-0) and PP=2 x TP=2
    with GQA and sequence parallelism: PP=1's losses (1e-5) and clip norms for 5 masked steps."""
    _, result = four
    run = next(r for r in RUNS4 if r["name"] == name)
    losses, norms = _pp1(single_process_world, run)
    assert not _differs(result["losses"][name], losses, norms), (result["losses"][name], losses, norms)
    assert all(n > CLIP for n in norms)


@pytest.mark.parallel
def test_clip_norms_must_be_summed_over_the_pipeline_group(single_process_world, four):
    """Mutation: without the pipeline-group all-reduce each stage clips by its own blocks' norm;
    the comparison with PP=1 sees it."""
    _, result = four
    run = next(r for r in RUNS4 if r["name"] == "pp2_tp2")
    losses, norms = _pp1(single_process_world, run)
    assert _differs(result["losses"]["mut_clip_no_pipeline_reduce"], losses, norms)


def _leaks(single_process_world, a: dict, b: dict) -> tuple[list[str], int]:
    """(retain/joint(non_forget) slices that differ between a and b, number of forget slices that do)."""
    _, model = build_model(layout_config({"arch": "llama3"}, 1), single_process_world)  # roles of the full tensors
    leaked, forget_changed, _ = slice_changes(model, a, b)
    return leaked, forget_changed


@pytest.mark.parallel
def test_isolation_through_pp2_x_tp2_with_gqa_and_sp(single_process_world, four):
    """20 steps at PP=2 x TP=2, GQA (2 KV heads), SP on, binding per-partition clipping: changing
    the content of forget spans leaves every retain and joint(non_forget) parameter on both stages
    bit-identical and changes forget ones; labelling those spans unlabelled changes retain ones.
    Mutation: modes dropped on stage 1 leaks within 2 steps."""
    out, _ = four
    saved = torch.load(out / "isolation.pt", weights_only=True)
    leaked, forget_changed = _leaks(single_process_world, saved["A"], saved["B"])
    assert not leaked, leaked
    assert forget_changed > 0
    control, _ = _leaks(single_process_world, saved["A"], saved["C"])
    assert control  # the comparison can see retain parameters move
    norms = saved["A_norms"]
    assert bool((norms > CLIP).all()), norms  # the clip bound every group
    leaked_mut, _ = _leaks(single_process_world, saved["mutA"], saved["mutB"])
    assert any(n.startswith(("blocks.2.", "blocks.3.", "final_norm", "lm_head")) for n in leaked_mut), leaked_mut


@pytest.mark.parallel
def test_ablation_and_evaluation_at_pp2_x_tp2(single_process_world, four):
    """Every (stage, TP rank) zeroed exactly its forget slices and left the rest; the gathered
    result equals ablating the PP=1 model; held-out per-token losses through the pipeline engine,
    full and ablated, equal PP=1's (relative to their scale, tests/support/compare.py)."""
    out, result = four
    ranks = result["ablation"]["ranks"]
    assert [(r["stage"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["ok"] for r in ranks) and all(r["forget_elements"] > 0 for r in ranks)
    saved = torch.load(out / "ablation.pt", weights_only=True)
    _, model = build_model(layout_config({"arch": "llama3"}, 1), single_process_world)
    load_full_state_dict(model, saved["before"])
    with torch.no_grad():
        for b, full, abl in zip(saved["batches"], saved["full"], saved["ablated"]):
            kw = dict(labels=b["labels"], modes=None, doc_ids=b["doc_ids"], return_per_token=True)
            assert_equivalent(full, model(b["input_ids"], **kw), "per-token losses")
            model.set_ablated([0])
            assert_equivalent(abl, model(b["input_ids"], **kw), "ablated per-token losses")
            model.set_ablated([])
    assert not torch.equal(saved["full"][0], saved["ablated"][0])
    ablate(model, [0])
    for name, p in model.named_parameters():
        assert torch.equal(saved["after"][name], p.detach()), name
    ev = result["ablation"]["eval"]
    valid = torch.cat([(b["labels"] != -100).flatten() for b in saved["batches"]])
    assert ev["tokens"] == int(valid.sum())
    assert ev["full"] == pytest.approx(float(torch.cat([t.flatten() for t in saved["full"]])[valid].mean()), abs=1e-5)


@pytest.mark.parallel
def test_checkpoint_resume_at_pp2_continues_exactly(single_process_world, two):
    """`sgtm train`'s loop at PP=2 (ZeRO-1, 2 micro-batches, per-partition clipping): a run stopped
    after step 3 (checkpoint) and resumed gives the uninterrupted run's losses and clip norms of
    steps 4-6 bit for bit, and the same final evaluation (full and ablated); `sgtm eval` of the
    PP checkpoint (consolidated to one PP=1 model) gives that evaluation too."""
    from pipeline.train.offline import evaluate_checkpoint

    out, result = two
    a, b = result["train_resume"]["A"], result["train_resume"]["B"]
    assert [r["step"] for r in b["train"]] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a["train"], b["train"]):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], (ra, rb)
        assert {k: v for k, v in ra.items() if k.startswith("grad_norm_")} == \
            {k: v for k, v in rb.items() if k.startswith("grad_norm_")}
    assert a["train"][0]["loss"] != a["train"][-1]["loss"]
    assert {k: v for k, v in a["final"].items() if k != "time"} == {k: v for k, v in b["final"].items() if k != "time"}
    assert a["final"]["forget_ablated"] != a["final"]["forget_full"]
    assert "step00000003" in b["tags"]
    offline = evaluate_checkpoint(out / "train_resume" / "B", out=str(out / "eval_B.json"))["sets"]
    for name in ("forget", "retain"):
        assert offline[name]["full"] == pytest.approx(b["final"][f"{name}_full"], abs=1e-5)
        assert offline[name]["ablated"] == pytest.approx(b["final"][f"{name}_ablated"], abs=1e-5)


@pytest.mark.parallel
@pytest.mark.parametrize("zero", [0, 1])
def test_a_nonfinite_step_is_skipped_on_every_stage(two, zero):
    """A NaN loss on the last stage at step 2 (ZeRO-0 and ZeRO-1, per-partition clipping): both
    stages report the step non-finite and keep every weight; steps 1 and 3 train; the LR schedule
    is the same on both stages."""
    ranks = two[1][f"nonfinite-zero{zero}"]
    assert [r["stage"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["finite"] == [True, False, True], r
        assert r["changed"] == [True, False, True], r
    assert ranks[0]["lr"] == ranks[1]["lr"]
