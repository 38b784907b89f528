"""Random partitions and random mode layouts for the isolation property, and its check.

One generator, two drivers: hypothesis draws the choices in-process (so failures shrink), and the
multi-process TP=2 scenarios (:func:`isolation_property` on every rank) draw them from a seeded
``random.Random`` (every rank the same case).
A case is a config plus two batches that agree on every non-forget position (input, target,
mode, document) and differ at the forget positions: their content (inputs and targets), which of
their labels are ignored (so the number of labelled forget positions differs) and, with several
domains, their domain; :func:`isolation_leaks` says which retain / joint(non_forget) gradient slices
differ between them, and which forget slices do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.codes import Mode, ParamClass
from tests.support.configs import SEQ, VOCAB, tiny_config

Pick = Callable[[int, int], int]  # an integer in [lo, hi], drawn by hypothesis or a seeded RNG
N_HEADS, D_FF, N_LAYERS = 4, 64, 2


@dataclass
class IsolationCase:
    overrides: dict
    tp: int
    batch: dict[str, torch.Tensor]
    changed: dict[str, torch.Tensor]  # the same batch with different forget-token content
    n_domains: int

    def config(self):
        return tiny_config(self.overrides["arch"], "sgtm", tp=self.tp, two_domains=False,
                           sgtm=self.overrides["sgtm"], model=self.overrides["model"])


def _subset(pick: Pick, pool: list[int], k: int) -> list[int]:
    pool = list(pool)
    out = []
    for _ in range(min(k, len(pool))):
        out.append(pool.pop(pick(0, len(pool) - 1)))
    return sorted(out)


def make_case(pick: Pick, tp: int = 1, batch: int = 3) -> IsolationCase:
    arch = ("gpt-neo", "llama", "llama3")[pick(0, 2)]
    # llama3: grouped-query (2 query heads per KV head) or multi-query attention; forget heads
    # are whole KV groups. Multi-query at TP=2: the one KV head is replicated on both ranks.
    n_kv = N_HEADS if arch != "llama3" else (2, 1)[pick(0, 1)]
    group = N_HEADS // n_kv
    n_domains = pick(1, 3)
    scope = ("attention_mlp", "attention", "mlp")[pick(0, 2)]
    free_groups, free_units = list(range(n_kv)), list(range(D_FF))
    domains = []
    for d in range(n_domains):
        groups = _subset(pick, free_groups, pick(0 if d else 1, 1) if len(free_groups) > 1 else 0)
        free_groups = [g for g in free_groups if g not in groups]
        heads = [g * group + i for g in groups for i in range(group)]
        units = _subset(pick, free_units, pick(1, 6))
        free_units = [u for u in free_units if u not in units]
        layers = None if pick(0, 2) else _subset(pick, list(range(N_LAYERS)), pick(1, N_LAYERS))
        domains.append({"name": f"d{d}", "heads": heads if scope != "mlp" else [],  # scope drops them: 0
                        "units": units if scope != "attention" else [], "layers": layers})
    sgtm = {
        "domains": domains, "scope": scope,
        "joint_update": ("non_forget", "all")[pick(0, 1)],
        "embedding_update": ("non_forget", "all")[pick(0, 1)],
        "output_projections": ("split", "joint")[pick(0, 3) // 3],
        "cross_mode_attention": ("segment", "detached_context")[pick(0, 1)],
    }

    # Documents: random cut points per row; modes: random runs over the SEQ + 1 window, so modes
    # change inside documents, at document edges, at the first position and at the last target.
    n_modes = Mode.FORGET + n_domains
    window_modes = torch.zeros(batch, SEQ + 1, dtype=torch.long)
    doc_ids = torch.zeros(batch, SEQ, dtype=torch.long)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < SEQ:
            length = pick(1, SEQ - pos)
            doc_ids[b, pos:pos + length] = doc
            doc, pos = doc + 1, pos + length
        pos = 0
        while pos < SEQ + 1:
            length = pick(1, min(6, SEQ + 1 - pos))
            window_modes[b, pos:pos + length] = pick(0, n_modes - 1)
            pos += length
    if not bool((window_modes >= Mode.FORGET).any()):
        window_modes[0, pick(0, SEQ)] = Mode.FORGET + pick(0, n_domains - 1)
    tokens = torch.tensor([[pick(0, VOCAB - 1) for _ in range(SEQ + 1)] for _ in range(batch)])
    other = torch.tensor([[pick(0, VOCAB - 1) for _ in range(SEQ + 1)] for _ in range(batch)])
    # Ignored labels: the same at non-forget positions; drawn again for the second batch at forget
    # positions (a position whose input is forget is forget whatever its label), so the number of
    # labelled forget positions differs between the two batches at the same non-forget positions.
    forget_in = window_modes[:, :-1] >= Mode.FORGET
    ignore = torch.tensor([[pick(0, 7) == 0 for _ in range(SEQ)] for _ in range(batch)])
    ignore_other = torch.tensor([[pick(0, 2) == 0 for _ in range(SEQ)] for _ in range(batch)])
    ignore_changed = torch.where(forget_in, ignore_other, ignore)
    # With several domains, which domain a forget position belongs to may differ too.
    shift = pick(0, n_domains - 1)
    forget = window_modes >= Mode.FORGET
    modes_changed = torch.where(forget, Mode.FORGET + (window_modes - Mode.FORGET + shift) % n_domains, window_modes)

    def batch_of(window: torch.Tensor, modes: torch.Tensor, ignored: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = window[:, 1:].clone()
        labels[ignored] = -100
        return {"input_ids": window[:, :-1].clone(), "labels": labels, "modes": modes[:, :-1].clone(),
                "target_modes": modes[:, 1:].clone(), "doc_ids": doc_ids.clone()}

    changed = torch.where(forget, (tokens + 1 + other % (VOCAB - 1)) % VOCAB, tokens)
    return IsolationCase({"arch": arch, "sgtm": sgtm, "model": {"n_kv_heads": n_kv}}, tp,
                         batch_of(tokens, window_modes, ignore), batch_of(changed, modes_changed, ignore_changed),
                         n_domains)


def gradients(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                 target_modes=batch["target_modes"])
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def isolation_leaks(model, case: IsolationCase) -> tuple[list[str], list[str]]:
    """(leaked, forget_changed): names of retain / joint(non_forget) slices whose gradient is not
    bit-identical between the two contents, and of forget slices whose gradient changed."""
    a, b = gradients(model, case.batch), gradients(model, case.changed)
    leaked, forget_changed = [], []
    for name, p in model.named_parameters():
        role = p.sgtm_role
        ga, gb = a.get(name, torch.zeros_like(p)), b.get(name, torch.zeros_like(p))
        for cls in {int(c) for c in role.classes}:
            sel = role.slice_mask(p, {cls}).expand_as(p)
            same = torch.equal(ga[sel], gb[sel])
            if cls in (ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET) and not same:
                leaked.append(f"{name}[class {cls}]")
            if cls >= 0 and not same:
                forget_changed.append(f"{name}[class {cls}]")
    return leaked, forget_changed


def forget_reaches_its_parameters(case: IsolationCase) -> bool:
    """Does a labelled forget position belong to a domain that owns parameters in some block?"""
    from pipeline.sgtm.masking import position_modes

    b = case.batch
    pos = position_modes(b["modes"], b["labels"], b["target_modes"])
    labelled = (pos >= Mode.FORGET) & (b["labels"] != -100)
    sgtm = case.overrides["sgtm"]
    for d in {int(m) - Mode.FORGET for m in pos[labelled].tolist()}:
        dom = sgtm["domains"][d]
        heads = dom["heads"] if sgtm["scope"] != "mlp" else []
        units = dom["units"] if sgtm["scope"] != "attention" else []
        if heads or units:
            return True
    return False


def slice_changes(model, a: dict, b: dict, c: dict | None = None) -> tuple[list[str], int, int]:
    """Between full state dicts ``a`` and ``b`` (classes from ``model``'s ``sgtm_role``): the
    retain/joint(non_forget) slices that differ, the number of forget slices that differ, and the
    number of retain slices that differ between ``a`` and the control ``c``."""
    from pipeline.commands.isolation import differing_slices

    ab = differing_slices(model, a, b)
    leaked = [f"{n}[class {cls}]" for cls in (ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET) for n in ab.get(cls, [])]
    forget_changed = sum(len(names) for cls, names in ab.items() if cls >= 0)
    control = len(differing_slices(model, a, c).get(ParamClass.RETAIN, [])) if c is not None else 0
    return leaked, forget_changed, control


def isolation_property(seeds: list[int], sequence_parallel: bool = False) -> dict:
    """The isolation property at TP=2 over random cases, on every rank of a 2-rank world (a
    scenario's body): the case of each seed drawn by a seeded RNG so every rank draws the same one;
    gradients compared shard by shard on every rank (``sequence_parallel``: with SP on). Returns
    the failures (leaks, or forget content that reached no forget slice), and how many cases were
    checked and could reach their forget parameters."""
    import dataclasses
    import random

    import torch.distributed as dist

    from pipeline.backend.distributed import init_distributed
    from pipeline.engine.engine import build_model

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
