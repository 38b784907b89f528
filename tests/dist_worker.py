"""Multi-process scenarios, started by tests/conftest.py:run_workers on N local gloo ranks.

Each scenario writes ``result.json`` (rank 0) and any tensors into the ``out`` directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.codes import Mode  # noqa: E402
from pipeline.engine.distributed import init_distributed  # noqa: E402
from pipeline.engine.engine import build_engine, build_model, train_step  # noqa: E402
from pipeline.model.tp_state import gather_full_state_dict  # noqa: E402
from pipeline.model.ablate import ablate  # noqa: E402
from tests.fixtures import isolation_batch, mixed_batch, tiny_config  # noqa: E402


def scaled_query_grad(factor: float = 1.05):
    """Test fault: the gradient flowing back into the query projection (dQ, taken at the attention
    call, after RoPE) multiplied by ``factor``, as a wrong score scale or RoPE backward under TP/SP
    would; the forward is untouched. Wraps ``F.scaled_dot_product_attention`` for this process."""
    import contextlib

    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.requires_grad:
            q.register_hook(lambda g: g * factor)
        return real(q, k, v, *args, **kwargs)

    stack = contextlib.ExitStack()
    F.scaled_dot_product_attention = sdpa
    stack.callback(setattr, F, "scaled_dot_product_attention", real)
    return stack


def scenario_tp_grads(out: Path, archs: list[str], dq_scaled: list[str] = ()) -> dict:
    """TP=2 loss and gathered gradients for a mixed batch, per arch; then ablation per shard. For
    the archs in ``dq_scaled`` also a run with dQ scaled by 1.05 (``tp2_{arch}_dq_scaled.pt``)."""
    import contextlib

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


def _kv_mutation(name: str | None):
    """A deliberately broken replicated-KV model (n_kv_heads < TP): the K/V rows' gradient left
    as each rank's partial sum (no all-reduce over the copies)."""
    import contextlib

    from pipeline.model import transformer

    stack = contextlib.ExitStack()
    if name == "kv_grads_not_summed":
        orig = transformer._replica_param
        transformer._replica_param = lambda p: p
        stack.callback(setattr, transformer, "_replica_param", orig)
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    return stack


def _replica_copies_equal(model) -> bool:
    """Whether every TP rank holding a copy of a replicated KV head holds the same gradient of it."""
    from megatron.core import parallel_state as ps

    same = True
    for p in model.parameters():
        c = int(getattr(p, "tp_kv_replicas", 1))
        if c > 1:
            tail = p.grad[-int(p.tp_kv_tail):].contiguous()
            parts = [torch.empty_like(tail) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, tail, group=ps.get_tensor_model_parallel_group())
            same &= all(torch.equal(parts[r], parts[r - r % c]) for r in range(len(parts)))
    return same


def scenario_tp_grads_configs(out: Path, cases: dict[str, dict], tp: int = 2) -> dict:
    """TP=``tp`` loss and gathered gradients of a mixed batch for named tiny_config overrides
    (optional ``mutation``), whether replicated KV copies hold equal gradients, the per-partition
    clip norms, and the gathered weights after ablating domain 0 on every shard."""
    from pipeline.components.clipping import PartitionClipper

    result = {}
    for name, over in cases.items():
        cfg = tiny_config(over["arch"], "sgtm", tp=tp, two_domains=False, model=over.get("model", {}),
                          sgtm=over.get("sgtm", {}))
        d = init_distributed(cfg.engine)
        with _kv_mutation(over.get("mutation")):
            part, model = build_model(cfg, d)
            batch = mixed_batch(n_domains=1)
            loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"],
                         doc_ids=batch["doc_ids"], target_modes=batch["target_modes"])
            loss.backward()
        full, grads = gather_full_state_dict(model), gather_full_state_dict(model, grads=True)
        copies_equal = _replica_copies_equal(model)
        clipper = PartitionClipper(model, 1, 1e9, torch.device("cpu"))  # per-partition norms (ZeRO-0 path)
        clipper.clip_param_grads()
        ablate(model, [0])
        ablated = gather_full_state_dict(model)
        owned = [None] * d.world_size
        dist.all_gather_object(owned, part.owned(d.tp_rank))
        if d.rank == 0:
            torch.save({"state": full, "grads": grads, "loss": loss.detach(), "ablated": ablated},
                       out / f"tp{tp}_{name}.pt")
        result[name] = {"owned": owned, "replica_grads_equal": copies_equal,
                        "kv_replicas": part.kv_replicas, "clip_norms": clipper.last_norms.tolist()}
    return result


MQA_TP2 = {"model": {"n_heads": 8, "n_kv_heads": 1},
           "sgtm": {"domains": [{"name": "es", "heads": [], "units": [3, 10, 31, 32, 40]}]},
           "engine": {"zero_stage": 1, "micro_batch_size": 6, "grad_clip": 1.0},
           "optimizer": {"lr": 3e-3, "weight_decay": 0.1}, "train": {"steps": 10}}


def mqa_config(tp: int):
    """llama3, 8 query heads and one KV head (replicated at TP=2), ZeRO-1: the checkpoint test's model."""
    return tiny_config("llama3", "sgtm", tp=tp, two_domains=False, **MQA_TP2)


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


def scenario_isolation_property(out: Path, seeds: list[int], sequence_parallel: bool = False) -> dict:
    """The isolation property at TP=2 over random cases (the same generator as the in-process
    hypothesis test, driven by a seeded RNG so every rank draws the same case). Gradients are
    compared shard by shard on every rank (``sequence_parallel``: with SP on)."""
    import dataclasses
    import random

    from tests.isolation_cases import forget_reaches_its_parameters, isolation_leaks, make_case

    failures, checked, reached = [], 0, 0
    for seed in seeds:
        rng = random.Random(seed)
        case = make_case(rng.randint, tp=2)
        cfg = case.config()
        if sequence_parallel:
            cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, sequence_parallel=True)).validate()
        d = init_distributed(cfg.engine)
        _, model = build_model(cfg, d)
        leaked, forget_changed = isolation_leaks(model, case)
        flags = [None] * d.world_size
        dist.all_gather_object(flags, (leaked, bool(forget_changed)))
        checked += 1
        if any(f[0] for f in flags):
            failures.append({"seed": seed, "leaked": [n for f in flags for n in f[0]][:5], "case": case.overrides})
        if forget_reaches_its_parameters(case):
            reached += 1
            if not any(f[1] for f in flags):
                failures.append({"seed": seed, "forget_unchanged": True, "case": case.overrides})
    return {"failures": failures, "checked": checked, "reached": reached}


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
            batch = global_batch(step)
            n = 4 // dp_size
            mb = {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in batch.items()}
            losses.append(float(train_step(state, [mb])))
        result[f"tp{run['tp']}_dp{dp_size}_zero{run['zero']}"] = losses
    return result


def dist_world() -> int:
    return int(os.environ["WORLD_SIZE"])


def global_batch(step: int) -> dict:
    b = mixed_batch(seed=step, batch=4)
    b["labels"] = b["input_ids"].roll(-1, dims=1)  # every position labelled: equal DP shares
    return b


def _sp_mutation(name: str | None):
    """A deliberately broken sequence-parallel model, to show the SP checks can fail: norm and
    row-bias gradients left as per-rank partial sums, the token masks in [B, S] order while the
    activations are [S, B], or dQ scaled by 1.05 (``scaled_query_grad``)."""
    import contextlib

    from pipeline.model import transformer
    from pipeline.sgtm.masking import TokenMasks

    stack = contextlib.ExitStack()
    if name == "dq_scaled":
        stack.enter_context(scaled_query_grad())
    elif name == "norm_grads_not_reduced":
        orig = transformer._sp_param
        transformer._sp_param = lambda p, sp: p
        stack.callback(setattr, transformer, "_sp_param", orig)
    elif name == "masks_batch_major":
        orig_build = TokenMasks._build

        def build(*args, seq_first):
            return orig_build(*args, seq_first=False)

        TokenMasks._build = staticmethod(build)
        stack.callback(setattr, TokenMasks, "_build", staticmethod(orig_build))
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    return stack


def scenario_sequence_parallel_grads(out: Path, cases: dict[str, dict]) -> dict:
    """TP=2 + SP: loss, gathered gradients, per-token losses, logits and hidden states of a mixed
    batch per named case (arch, model/sgtm overrides, two_domains, optional mutation); and whether
    every SP-marked (replicated, sequence-sharded) parameter's gradient is the same on both ranks."""
    result = {}
    for name, over in cases.items():
        two = over.get("two_domains", True)
        cfg = tiny_config(over["arch"], over.get("strategy", "sgtm"), tp=2, two_domains=two,
                          model=over.get("model", {}), sgtm=over.get("sgtm", {}), engine={"sequence_parallel": True})
        d = init_distributed(cfg.engine)
        with _sp_mutation(over.get("mutation")):
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


def scenario_sequence_parallel_isolation(out: Path, seeds: list[int], mutation_seeds: list[int]) -> dict:
    """The isolation property at TP=2 + SP over ``seeds``, then over ``mutation_seeds`` with the
    token masks in the wrong ([B, S]) order, which the check must report (one launch for both)."""
    clean = scenario_isolation_property(out, seeds, sequence_parallel=True)
    with _sp_mutation("masks_batch_major"):
        mutated = scenario_isolation_property(out, mutation_seeds, sequence_parallel=True)
    return {"clean": clean, "mutated": mutated}


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


def scenario_elastic_train(out: Path, phase: str, config: dict, steps: int, resume: bool) -> dict:
    """One phase of an elastic chain: ``sgtm train``'s loop (``pipeline.train.loop.train``) for
    ``steps`` steps on this world, with --resume from the run's latest checkpoint (written on
    another layout). Instrumented, nothing replaced: the full train state right after the restore
    and right before the final save (rank 0 writes them, with the LR and ``resharded_from``), and
    every batch this rank's loader delivered."""
    from megatron.core import parallel_state as ps

    from pipeline.components import checkpoint
    from pipeline.config import load_config
    from pipeline.data import loader as loader_mod
    from pipeline.train import loop

    seen, dumps = [], {}
    real_next, real_restore, real_save = loader_mod.StreamingLoader.__next__, checkpoint.restore, checkpoint.save

    def recording_next(self):
        batch = real_next(self)
        seen.append({k: batch[k].clone() for k in ("input_ids", "labels", "source_ids", "doc_index")})
        return batch

    def restore(engine, *args, **kwargs):
        client = real_restore(engine, *args, **kwargs)
        dumps.update(after_restore=checkpoint.full_train_state(engine), lr_after=engine.get_lr(),
                     resharded_from=client.get("resharded_from"))
        return client

    def save(engine, *args, **kwargs):
        dumps.update(before_save=checkpoint.full_train_state(engine), lr_before=engine.get_lr())
        return real_save(engine, *args, **kwargs)

    loader_mod.StreamingLoader.__next__ = recording_next
    checkpoint.restore, checkpoint.save = restore, save
    loop.train(load_config(data=config), resume=resume, max_steps=steps)
    rank = dist.get_rank()
    torch.save(seen, out / f"{phase}_batches_rank{rank}.pt")
    if rank == 0:
        torch.save(dumps, out / f"{phase}_state.pt")
    return {"world": dist.get_world_size(), "dp": ps.get_data_parallel_world_size(),
            "tp": ps.get_tensor_model_parallel_world_size()}


def main(scenarios: dict | None = None) -> None:
    """Run ``scenario_<argv[1]>`` from ``scenarios`` (another worker module's globals) or this
    module's; rank 0 writes its result atomically."""
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    out = Path(args.pop("out"))
    result = (scenarios or globals())[f"scenario_{scenario}"](out, **args)
    if int(os.environ["RANK"]) == 0:
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.rename(out / "result.json")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
