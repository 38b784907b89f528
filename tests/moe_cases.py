"""Tiny MoE configs and deliberate breakages of the MoE masking, shared by the in-process tests
(tests/test_moe.py) and the multi-process worker (tests/moe_worker.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.fixtures import tiny_config

# Two domains: 'es' owns routed expert 1 (EP rank 0 at EP=2) and a KV group; 'fr' owns expert 2
# (EP rank 1). With a shared expert, 'es' also owns two of its units.
ES = {"name": "es", "heads": [0, 1], "units": 0, "experts": [1]}
FR = {"name": "fr", "heads": 0, "units": 0, "experts": [2]}


def moe_config(ep: int = 1, tp: int = 1, shared: int = 0, capacity: float | None = None, arch: str = "llama3",
               joint_update: str = "non_forget", engine: dict | None = None, model: dict | None = None,
               sgtm: dict | None = None, **extra):
    """2 blocks, d=32, 4 heads / 2 KV heads (llama3), 4 routed experts of width 64, top-2."""
    es = dict(ES, units=[3, 40]) if shared else ES
    m = {"n_experts": 4, "moe_top_k": 2, "moe_shared_experts": shared, "moe_capacity_factor": capacity,
         **({"n_kv_heads": 2} if arch == "llama3" else {}), **(model or {})}
    s = {"domains": [es, FR], **(sgtm or {})}
    return tiny_config(arch, "sgtm", tp=tp, joint_update=joint_update, model=m, sgtm=s,
                       engine={"expert_parallel": ep, **(engine or {})}, **extra)


MUTATIONS = ("retain_routes_to_forget", "experts_unmasked", "aux_over_all_tokens", "forget_tokens_compete")


@contextlib.contextmanager
def mutation(name: str | None) -> Iterator[None]:
    """A deliberately broken MoE, to show the checks can fail:

    * retain_routes_to_forget: retain-mode tokens may route to forget experts;
    * experts_unmasked: expert weight gradients summed over every routed token (allow vectors dropped);
    * aux_over_all_tokens: the load-balancing loss counts forget tokens too;
    * forget_tokens_compete: capacity filled without putting non-forget tokens first."""
    from pipeline.model.moe import MoE

    if name is None:
        yield
        return
    if name not in MUTATIONS:
        raise ValueError(f"unknown mutation {name!r} (expected one of {MUTATIONS})")
    saved = {}

    def patch(attr, fn):
        saved[attr] = getattr(MoE, attr)
        setattr(MoE, attr, fn)

    if name == "retain_routes_to_forget":
        real = MoE._blocked
        patch("_blocked", lambda self, masks, T: real(self, None, T))
    elif name == "experts_unmasked":
        patch("_kind", lambda self, masks, nonforget, T: None)
    elif name == "aux_over_all_tokens":
        real_aux = MoE._aux
        patch("_aux", lambda self, probs, top_e, nonforget: real_aux(self, probs, top_e, None))
    elif name == "forget_tokens_compete":
        real_cap = MoE._capacity
        patch("_capacity", lambda self, top_p, top_e, nonforget: real_cap(self, top_p, top_e, None))
    try:
        yield
    finally:
        for attr, fn in saved.items():
            setattr(MoE, attr, fn)
