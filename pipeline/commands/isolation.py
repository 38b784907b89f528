"""`sgtm check-isolation`: the isolation invariant, checked on the engine a run will use.

The property tests (tests/test_masking.py, tests/test_parallel.py) prove the invariant on CPU at
tiny sizes. A lab about to spend GPU-weeks wants it checked on *its* config, device, precision and
parallel layout: four short runs from one initialisation through the real DeepSpeed engine -

* ``A``: sequences of several documents whose modes change inside them (retain and unlabelled
  runs around forget runs; forget at the first position and as the last target; some ignored
  labels at non-forget positions). Unlabelled runs are in the first step only: after it an
  unlabelled position reads forget parameters that forget data trained, so over several steps
  the invariant covers retain-mode tokens alone (docs/architecture.md, "Isolation you can test");
  later steps have retain runs there;
* ``A'``: ``A`` again (the floor: a device whose kernels are not deterministic differs here);
* ``B``: ``A`` changed only at forget positions: other content, other forget domains, other
  document cuts, and about 40% of their labels ignored (so another number of labelled forget
  tokens); every non-forget position keeps its input, label, mode and document;
* ``C``: ``B`` with the forget runs unlabelled (the control: the comparison can see a change).

The invariant holds when every retain and joint(non_forget) slice of ``A`` and ``B`` is
bit-identical while forget slices differ, ``A`` equals ``A'`` and ``C`` changes retain slices.
The compared tensors are what the optimizer holds - the fp32 master weights and Adam's
``exp_avg``/``exp_avg_sq`` (``deepspeed_internals.optimizer_held_state``) - and the module's
weights: under bf16 the module holds the masters rounded to bf16, which hides a leak that moves
a master by less than one bf16 step. Slices are compared per rank on the local (TP-sharded,
DP-gathered) tensors by their ``sgtm_role``, so no TP gather is needed at any layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from pipeline.codes import Mode, ParamClass

RUNS = (("A", 1, Mode.FORGET), ("A'", 1, Mode.FORGET), ("B", 2, Mode.FORGET), ("C", 2, Mode.UNLABELLED))
STATES = ("master", "exp_avg", "exp_avg_sq", "module")  # what is compared, per parameter
NON_FORGET = (ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET)
_F = -1  # a forget run in a layout template (its mode and content are the run's to choose)


def _template(row: int, n: int, unlabelled: bool) -> torch.Tensor:
    """The modes of one ``n``-token window (``_F`` for forget runs): forget in the middle, at the
    start, as the last target only and in short runs; unlabelled runs between (or retain ones)."""
    R, q = int(Mode.RETAIN), max(1, n // 8)
    U = int(Mode.UNLABELLED) if unlabelled else R
    templates = [[(R, q), (_F, q), (U, q), (R, q), (_F, n)],
                 [(_F, q), (R, q), (U, 1), (_F, 2), (U, q), (R, n)],
                 [(U, q), (R, n - q - 1), (_F, 1)],
                 [(R, 2), (_F, 2), (U, 2), (_F, 1), (R, 2), (_F, 3), (R, n)]]
    window, pos = torch.full((n,), R, dtype=torch.long), 0
    for mode, length in templates[row % len(templates)]:
        length = max(0, min(length, n - pos))
        window[pos:pos + length] = mode
        pos += length
    return window


def isolation_batch(step: int, forget_seed: int, forget_mode: int, rows: int, seq: int, vocab: int,
                    rank: int = 0, n_domains: int = 1, unlabelled: bool = True) -> dict[str, torch.Tensor]:
    """``rows`` sequences of 2-4 documents. What is not forget (retain and unlabelled runs, their
    content, document cuts and ignored labels) depends only on (step, rank); forget positions
    depend only on ``forget_seed``: their content, domain (one of ``n_domains``), extra document
    cuts and, for an even seed, about 40% of their labels ignored. Only positions whose *input*
    is forget get ignored labels: ignoring the label of a non-forget position with a forget target
    would make it a non-forget position (``masking.position_modes``). ``forget_mode``
    ``Mode.UNLABELLED`` turns the forget runs unlabelled (the control run); ``unlabelled=False``
    makes the other unlabelled runs retain."""
    n = seq + 1
    g_keep = torch.Generator().manual_seed(10_000 + 1_000_003 * rank + step)
    g_forget = torch.Generator().manual_seed(forget_seed * 100_000 + 1_000_003 * rank + step)
    keep = torch.randint(0, vocab, (rows, n), generator=g_keep)
    base = torch.stack([_template(b, n, unlabelled) for b in range(rows)])
    cuts = torch.zeros(rows, seq, dtype=torch.long)
    for b in range(rows):  # 1-3 document starts after position 0
        k = 1 + int(torch.randint(0, 3, (), generator=g_keep))
        cuts[b, torch.randperm(max(1, seq - 1), generator=g_keep)[:k] + 1] = 1
    doc_ids = cuts[:, :seq].cumsum(1)
    ignored = torch.rand(rows, seq, generator=g_keep) < 0.15
    forget = base == _F
    content = torch.randint(0, vocab, (rows, n), generator=g_forget)
    domain = torch.randint(0, n_domains, (rows, n), generator=g_forget)
    new_doc = (torch.rand(rows, seq, generator=g_forget) < 0.2) & forget[:, :seq]
    forget_ignored = (torch.rand(rows, seq, generator=g_forget) < 0.4) & forget[:, :seq]
    if forget_seed % 2:
        forget_ignored[:] = False
    fmode = Mode.FORGET + domain if forget_mode >= Mode.FORGET else torch.full_like(domain, int(forget_mode))
    window = torch.where(forget, fmode, base)
    tokens = torch.where(forget, content, keep)
    seg = new_doc.long().cumsum(1)  # forget positions after a cut get documents no other position has
    doc_ids = torch.where(forget[:, :seq] & (seg > 0), 100 + seg, doc_ids)
    labels = tokens[:, 1:].clone()
    labels[(ignored & ~forget[:, :seq]) | forget_ignored] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels, "modes": window[:, :-1],
            "target_modes": window[:, 1:], "doc_ids": doc_ids}


def held_tensors(state) -> dict[str, dict[str, torch.Tensor]]:
    """Per compared state (:data:`STATES`), parameter name -> this rank's tensor, on CPU in fp32.
    Collective (the ZeRO partitions are gathered over DP)."""
    from pipeline.backend import deepspeed_internals as dsi

    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in STATES}
    for name, p in state.model.named_parameters():
        held = dsi.optimizer_held_state(state.engine, p)
        missing = {"param", "exp_avg", "exp_avg_sq"} - held.keys()
        if missing:
            raise RuntimeError(f"check-isolation: the optimizer holds no {sorted(missing)} for {name} "
                               f"(optimizer.type must be Adam-like, and the run must have stepped)")
        for key, held_key in (("master", "param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            out[key][name] = held[held_key].detach()
        out["module"][name] = p.detach().float().cpu().clone()
    return out


def differing_slices(model: torch.nn.Module, a: dict, b: dict) -> dict[int, list[str]]:
    """Parameter-slice class -> names of the local tensors whose slices of that class differ."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        role = getattr(p, "sgtm_role", None)
        if role is None:
            continue
        for cls in sorted(set(role.classes.tolist())):
            mask = role.slice_mask(a[name], {cls}).expand_as(a[name])
            if not torch.equal(a[name][mask], b[name][mask]):
                out.setdefault(int(cls), []).append(name)
    return out


def bf16_steps(model: torch.nn.Module, a: dict, b: dict) -> float:
    """The largest retain/joint(non_forget) difference between fp32 masters ``a`` and ``b``, in
    bf16 steps of ``a`` (below 1: a bf16 weight need not move, so only the masters show it)."""
    worst = 0.0
    for name, p in model.named_parameters():
        role = getattr(p, "sgtm_role", None)
        if role is None:
            continue
        mask = role.slice_mask(a[name], set(map(int, NON_FORGET))).expand_as(a[name])
        x, y = a[name][mask], b[name][mask]
        if x.numel() and not torch.equal(x, y):
            step = torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)  # bf16: 8 significant bits
            worst = max(worst, float(((x - y).abs() / step).max()))
    return worst


def check_isolation(cfg, steps: int = 20, log=print) -> dict:
    """Run A, A', B and C through ``build_engine`` / ``train_step`` and compare what each holds
    with A's (see the module docstring); A's tensors are kept, the others compared as they finish.
    Every rank returns the same verdict (counts are all-reduced)."""
    from pipeline.engine.engine import build_engine, train_step

    if cfg.sgtm.strategy != "sgtm" or not cfg.sgtm.domains:
        raise ValueError("sgtm.strategy: check-isolation needs strategy 'sgtm' and at least one forget domain")
    if cfg.engine.precision != "fp32" or torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    t0, base, model, diffs, moved = time.perf_counter(), None, None, {}, 0.0
    for name, forget_seed, mode in RUNS:
        state = build_engine(cfg)
        rank = state.dist.dp_rank  # TP ranks of one replica read the same data
        rows, seq = cfg.engine.micro_batch_size, cfg.model.max_seq_len
        for step in range(steps):
            batches = [isolation_batch(step * cfg.engine.grad_accum_steps + i, forget_seed, int(mode), rows, seq,
                                       cfg.model.vocab_size, rank, len(cfg.sgtm.domains), unlabelled=step == 0)
                       for i in range(cfg.engine.grad_accum_steps)]
            train_step(state, batches)
        held, model = held_tensors(state), state.model
        if base is None:
            base = held
        else:
            diffs[name] = {k: differing_slices(model, base[k], held[k]) for k in STATES}
            if name == "B":
                moved = bf16_steps(model, base["master"], held["master"])
        log(f"[check-isolation] run {name}: {steps} steps done")
        del state, held
    ab, floor, ac = diffs["B"], diffs["A'"], diffs["C"]
    table = [[sum(len(ab[k].get(c, [])) for c in NON_FORGET) for k in STATES],
            [sum(len(v) for c, v in ab[k].items() if c >= 0) for k in STATES],
            [sum(len(v) for v in floor[k].values()) for k in STATES],
            [len(ac[k].get(ParamClass.RETAIN, [])) for k in STATES]]
    leaked_names = sorted({n for k in STATES for c in NON_FORGET for n in ab[k].get(c, [])})
    counts = torch.tensor([*(x for r in table for x in r), len(leaked_names)], dtype=torch.float64)
    worst = torch.tensor([moved], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    per = counts[:-1].view(4, len(STATES)).long().tolist()
    leaked, forget_changed, nondeterministic, control = (sum(r) for r in per)
    verdict = ("inconclusive: the same run twice differs (non-deterministic kernels)" if nondeterministic
               else "inconclusive: unlabelling the forget runs changed no retain slice" if not control
               else "inconclusive: forget content changed no forget slice" if not forget_changed
               else "leaks" if leaked else "holds")
    return {"verdict": verdict, "steps": steps, "compared": list(STATES),
            "leaked_tensors": int(counts[-1]), "leaked": leaked_names,
            "leaked_per_state": dict(zip(STATES, per[0])), "leak_bf16_steps": float(worst),
            "forget_tensors_changed": forget_changed, "repeat_differs": nondeterministic,
            "control_retain_tensors_changed": control, "seconds": round(time.perf_counter() - t0, 1),
            "layout": {"tp": cfg.engine.tensor_parallel, "pp": cfg.engine.pipeline_parallel,
                       "zero": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                       "device": cfg.engine.device, "clip": cfg.engine.grad_clip, "clip_mode": cfg.engine.clip_mode}}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-isolation", help="check the isolation invariant on a config's engine (4 short runs)",
        description="Train 4 short runs that differ only at forget positions (content, domains, document "
                    "cuts, ignored labels) and check that the retain and joint(non_forget) fp32 masters, Adam "
                    "moments and weights stay bit-identical. Exit code 0: holds; 1: leaks or inconclusive.")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="write the result here")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    if args.steps < 1:
        raise ValueError(f"--steps: expected a positive number of steps, got {args.steps}")
    cfg = load_config(args.config, args.overrides)
    result = check_isolation(cfg, args.steps, log=lambda m: print(m, file=sys.stderr, flush=True))
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        print(json.dumps(result))
        if args.json:
            from pipeline.data.io import atomic_write_json

            atomic_write_json(args.json, result)
    return 0 if result["verdict"] == "holds" else 1
