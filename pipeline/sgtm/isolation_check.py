"""`sgtm check-isolation`: the isolation invariant, checked on the engine a run will use.

The property tests (tests/test_masking.py, tests/test_parallel.py) prove the invariant on CPU at
tiny sizes. A lab about to spend GPU-weeks wants it checked on *its* config, device, precision and
parallel layout: four short runs from one initialisation through the real DeepSpeed engine -

* ``A``: documents whose mode changes inside them (retain-mode text around forget spans);
* ``A'``: ``A`` again (the floor: a device whose kernels are not deterministic differs here);
* ``B``: ``A`` with other content in the forget spans;
* ``C``: ``B`` with those spans unlabelled (the control: the comparison can see a change).

The invariant holds when every retain and joint(non_forget) slice of ``A`` and ``B`` is
bit-identical while forget slices differ, ``A`` equals ``A'`` and ``C`` changes retain slices.
Slices are compared per rank on the local (TP-sharded) parameters by their ``sgtm_role``, so no
gather is needed at any TP/DP size. The compared tensors are the module's parameters (bf16 under
bf16 training; the fp32 masters feed them, so a master that moved moves them unless the change is
below bf16 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pipeline.sgtm.codes import Mode, ParamClass

RUNS = (("A", 1, Mode.FORGET), ("A'", 1, Mode.FORGET), ("B", 2, Mode.FORGET), ("C", 2, Mode.UNLABELLED))


def isolation_batch(step: int, forget_seed: int, forget_mode: int, rows: int, seq: int, vocab: int,
                    rank: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` one-document rows whose mode changes inside the document: retain-mode spans with
    content fixed by (step, rank) and ``forget_mode`` spans whose content depends only on
    ``forget_seed`` - at the start, in the middle, at the end, as the last target only, and short
    spans interleaved with retain text."""
    g_keep = torch.Generator().manual_seed(10_000 + 1_000_003 * rank + step)
    g_forget = torch.Generator().manual_seed(forget_seed * 100_000 + 1_000_003 * rank + step)
    keep = torch.randint(0, vocab, (rows, seq + 1), generator=g_keep)
    forget = torch.randint(0, vocab, (rows, seq + 1), generator=g_forget)
    R, F, q = int(Mode.RETAIN), int(forget_mode), max(1, seq // 4)
    layouts = [[(R, q), (F, q), (R, seq + 1 - 2 * q)], [(F, q), (R, seq + 1 - q)], [(R, seq), (F, 1)],
               [(R, 3), (F, 2), (R, 3), (F, seq + 1 - 8)]]
    window = torch.full((rows, seq + 1), R, dtype=torch.long)
    for b in range(rows):
        pos = 0
        for mode, length in layouts[b % len(layouts)]:
            length = max(0, min(length, seq + 1 - pos))
            window[b, pos:pos + length] = mode
            pos += length
    tokens = torch.where(window == F, forget, keep)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "modes": window[:, :-1],
            "target_modes": window[:, 1:], "doc_ids": torch.zeros(rows, seq, dtype=torch.long)}


def _local_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


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


def check_isolation(cfg, steps: int = 20, log=print) -> dict:
    """Run A, A', B and C through ``build_engine`` / ``train_step`` and compare them (see the
    module docstring). Every rank returns the same verdict (counts are all-reduced)."""
    from pipeline.engine.engine import build_engine, train_step

    if cfg.sgtm.strategy != "sgtm" or not cfg.sgtm.domains:
        raise ValueError("sgtm.strategy: check-isolation needs strategy 'sgtm' and at least one forget domain")
    if cfg.engine.precision != "fp32" or torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    finals, model = {}, None
    for name, forget_seed, mode in RUNS:
        state = build_engine(cfg)
        rank = state.dist.dp_rank  # TP ranks of one replica read the same data
        rows, seq = cfg.engine.micro_batch_size, cfg.model.max_seq_len
        for step in range(steps):
            batches = [isolation_batch(step * cfg.engine.grad_accum_steps + i, forget_seed, int(mode), rows, seq,
                                       cfg.model.vocab_size, rank) for i in range(cfg.engine.grad_accum_steps)]
            train_step(state, batches)
        finals[name] = _local_params(state.model)
        model = state.model
        log(f"[check-isolation] run {name}: {steps} steps done")
        del state
    ab = differing_slices(model, finals["A"], finals["B"])
    floor = differing_slices(model, finals["A"], finals["A'"])
    ac = differing_slices(model, finals["A"], finals["C"])
    non_forget = (ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET)
    counts = torch.tensor([sum(len(ab.get(c, [])) for c in non_forget),
                           sum(len(v) for c, v in ab.items() if c >= 0),
                           sum(len(v) for v in floor.values()),
                           len(ac.get(ParamClass.RETAIN, []))], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    leaked, forget_changed, nondeterministic, control = (int(x) for x in counts.tolist())
    verdict = ("inconclusive: the same run twice differs (non-deterministic kernels)" if nondeterministic
               else "inconclusive: unlabelling the forget spans changed no retain slice" if not control
               else "inconclusive: forget content changed no forget slice" if not forget_changed
               else "leaks" if leaked else "holds")
    return {"verdict": verdict, "steps": steps, "leaked_tensors": leaked,
            "leaked": sorted({n for c in non_forget for n in ab.get(c, [])}),
            "forget_tensors_changed": forget_changed, "repeat_differs": nondeterministic,
            "control_retain_tensors_changed": control,
            "layout": {"tp": cfg.engine.tensor_parallel, "zero": cfg.engine.zero_stage,
                       "precision": cfg.engine.precision, "device": cfg.engine.device,
                       "clip": cfg.engine.grad_clip, "clip_mode": cfg.engine.clip_mode}}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-isolation", help="check the isolation invariant on a config's engine (4 short runs)",
        description="Train 4 short runs that differ only in forget-span content and check that "
                    "retain and joint(non_forget) parameters stay bit-identical. Exit code 0: holds; "
                    "1: leaks or inconclusive.")
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
