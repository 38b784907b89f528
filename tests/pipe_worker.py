"""Multi-process pipeline-parallel scenarios (tests/test_pipeline_parallel.py), on N local gloo
ranks: ``python tests/pipe_worker.py SCENARIO '{json args}'``; rank 0 writes ``result.json`` and
tensors into ``out``. Several scenarios run in one launch (``scenario_all``) so the suite pays
DeepSpeed's start-up once per world size."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.engine.engine import build_engine, train_step  # noqa: E402
from tests import dist_worker  # noqa: E402
from tests.fixtures import isolation_batch, mixed_batch, tiny_config  # noqa: E402

# GQA (8 query heads, 2 KV heads: one KV group per TP=2 rank), RoPE, untied: the llama3 shape.
GQA = {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 2}, "two_domains": False,
       "sgtm": {"domains": [{"name": "es", "heads": [4, 5, 6, 7], "units": [3, 10, 31, 32, 40]}]}}
BLOCKS = 4  # two blocks per stage at PP=2 (the stage's layers share its masks)
CLIP_NF = 0.5


def config(run: dict, steps: int):
    """A tiny experiment for ``run``: {pp, tp, zero, gas, clip, sp, precision, arch}."""
    dp = int(os.environ.get("WORLD_SIZE", "1")) // (run.get("tp", 1) * run.get("pp", 1))
    over = GQA if run.get("arch") == "llama3" else {"arch": run.get("arch", "llama")}
    return tiny_config(over["arch"], "sgtm", tp=run.get("tp", 1), two_domains=over.get("two_domains", True),
                       model={"n_layers": BLOCKS, **over.get("model", {})}, sgtm=over.get("sgtm", {}),
                       engine={"pipeline_parallel": run.get("pp", 1), "zero_stage": run.get("zero", 1),
                               "micro_batch_size": 4 // dp // run.get("gas", 1), "grad_accum_steps": run.get("gas", 1),
                               "grad_clip": run.get("clip", 0.0), "sequence_parallel": run.get("sp", False),
                               "precision": run.get("precision", "fp32")},
                       optimizer={"lr": 3e-3, "weight_decay": 0.1}, train={"steps": steps},
                       eval={"calibrate": False})


def dp_share(batch: dict, dp_rank: int, dp_size: int, gas: int) -> list[dict]:
    """This DP rank's micro-batches of a global batch of 4 rows."""
    n = 4 // dp_size
    mine = {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in batch.items()}
    m = n // gas
    return [{k: v[i * m:(i + 1) * m] for k, v in mine.items()} for i in range(gas)]


def global_batch(step: int, n_domains: int) -> dict:
    b = mixed_batch(seed=step, batch=4, n_domains=n_domains)
    b["labels"] = b["input_ids"].roll(-1, dims=1)  # every position labelled: equal DP shares
    return b


@contextlib.contextmanager
def mutation(name: str | None):
    """Deliberately broken pipelines, to show the checks can fail: the clip norms not summed over
    the pipeline group, or the per-token modes dropped (all unlabelled) on stage 1."""
    from pipeline.components import clipping
    from pipeline.model import pipe_stages

    undo = contextlib.ExitStack()
    if name == "clip_no_pipeline_reduce":
        orig = clipping.reduce_over_pipeline
        clipping.reduce_over_pipeline = lambda sq: None
        undo.callback(setattr, clipping, "reduce_over_pipeline", orig)
    elif name == "modes_dropped_on_stage1":
        orig_call = pipe_stages.StageMasks.__call__

        def call(self, modes, doc_ids, labels, target_modes):
            from megatron.core import parallel_state as ps

            if ps.get_pipeline_model_parallel_rank() == 1:
                modes, target_modes = torch.zeros_like(modes), torch.zeros_like(target_modes)
            return orig_call(self, modes, doc_ids, labels, target_modes)

        pipe_stages.StageMasks.__call__ = call
        undo.callback(setattr, pipe_stages.StageMasks, "__call__", orig_call)
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    with undo:
        yield


def scenario_losses(out: Path, runs: list[dict], steps: int) -> dict:
    """Losses (and last clip norms) of ``steps`` masked steps with mixed modes per run, on the same
    global batches, each DP rank its share."""
    result = {}
    for run in runs:
        with mutation(run.get("mutation")):
            cfg = config(run, steps)
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
        with mutation(mut):
            state = build_engine(config(run, n))
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

    state = build_engine(config({"arch": "llama3", "pp": 2, "tp": 2}, 1))
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

    state = build_engine(config({"pp": 2, "zero": zero, "clip": CLIP_NF, "gas": 2}, 3))
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
    return {name: globals()[f"scenario_{name.split('-')[0]}"](out, **kwargs) for name, kwargs in parts.items()}


if __name__ == "__main__":
    dist_worker.main(globals())
