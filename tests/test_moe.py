"""Forget experts: MoE layers with SGTM masking and expert parallelism (pipeline/model/moe.py).

In-process (fast): one MoE layer against an independent per-token reference (hypothesis over
expert partitions, modes, strategies, capacity and ablation), the isolation property of whole MoE
models over random partitions and mode layouts, and mutations that make each check fail.
Multi-process (``parallel``): EP=2 equals EP=1 (loss, gradients, ablation per shard) and the
isolation invariant through DeepSpeed at EP=2 over several steps."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.backend.distributed import ep_world, init_distributed
from pipeline.codes import Mode, ParamClass
from pipeline.config import ConfigError
from pipeline.engine.engine import build_engine, build_model, train_step
from pipeline.model import moe
from pipeline.model.ablate import ablate
from pipeline.model.moe import MoE, expert_ownership
from tests.support import ROOT
from tests.support.batches import isolation_batch, mixed_batch
from tests.support.compare import SCALE_AFTER_STEPS, assert_all_equivalent, assert_equivalent
from tests.support.configs import moe_config, tiny_config
from tests.support.isolation import isolation_leaks, make_case, slice_changes
from tests.support.launch import run_scenario
from tests.support.mutations import moe_mutation

TOL = dict(rtol=1e-4, atol=1e-6)
FORGET, RETAIN = int(Mode.FORGET), int(Mode.RETAIN)


# ------------------------------------------------------------------------------ reference


def _allowed(modes: torch.Tensor, cls: int, strategy: str) -> torch.Tensor:
    """[T] 0/1: may a token of each mode update a parameter of class ``cls`` (spelled out)."""
    non_forget = modes < FORGET
    if strategy == "none" or cls == ParamClass.JOINT_ALL:
        return torch.ones(len(modes))
    if cls == ParamClass.JOINT_NON_FORGET:
        return non_forget.float()
    if strategy != "sgtm":
        return torch.ones(len(modes))
    if cls == ParamClass.RETAIN:
        return non_forget.float()
    return (non_forget | (modes == FORGET + cls)).float()


def reference_moe(P: dict, cfg, classes: list[int], x: torch.Tensor, modes: torch.Tensor, strategy: str,
                  ablated: set[int], own_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, d], aux) of one MoE layer, token by token: route (retain-mode tokens never to forget
    experts, nobody to ablated ones), top-k with renormalised weights, per-expert capacity in
    priority order (non-forget tokens first, then probability or position), switch aux loss over
    non-forget tokens. ``own_first``: a forget:d token takes d's unablated experts first."""
    T, E, k = x.shape[0], cfg.n_experts, cfg.moe_top_k
    f = cfg.d_ff
    mode_aware = strategy != "none"
    probs, chosen = [], []
    for t in range(T):
        logits = P["router"] @ x[t]
        off = [e for e in range(E) if e in ablated or (mode_aware and strategy != "gradient_routing"
                                                       and int(modes[t]) == RETAIN and classes[e] >= 0)]
        for e in off:
            logits = torch.cat([logits[:e], logits[e:e + 1] * 0 - math.inf, logits[e + 1:]])
        p = logits.softmax(-1)
        probs.append(p)
        own = [e for e in range(E) if own_first and int(modes[t]) >= FORGET and classes[e] == int(modes[t]) - FORGET
               and e not in ablated]
        by_p = lambda es, p=p: sorted(es, key=lambda i: -float(p[i]))  # noqa: E731
        chosen.append((by_p(own) + by_p([e for e in range(E) if e not in own]))[:k])
    late = [mode_aware and int(modes[t]) >= FORGET for t in range(T)]
    assign = [(t, j, chosen[t][j]) for t in range(T) for j in range(k)]
    keep = set(assign)
    if cfg.moe_capacity_factor is not None:
        cap = math.ceil(cfg.moe_capacity_factor * T * k / E)
        if cfg.moe_drop_policy == "probs":
            order = sorted(assign, key=lambda a: (late[a[0]], -float(probs[a[0]][a[2]])))
        else:
            order = sorted(assign, key=lambda a: (late[a[0]], a[0] * k + a[1]))
        taken = [0] * E
        keep = set()
        for a in order:
            if taken[a[2]] < cap:
                keep.add(a)
            taken[a[2]] += 1
    ys = []
    for t in range(T):
        y = torch.zeros(x.shape[1])
        total = sum(probs[t][e] for e in chosen[t])
        for j, e in enumerate(chosen[t]):
            if (t, j, e) not in keep:
                continue
            h = P[f"w_in{e}"] @ x[t]
            h = F.silu(h[:f]) * h[f:] if cfg.mlp == "swiglu" else F.gelu(h)
            y = y + probs[t][e] / total * (P[f"w_out{e}"] @ h)
        ys.append(y)
    counted = [t for t in range(T) if not late[t]]
    aux = torch.zeros(())
    if counted and cfg.moe_aux_loss_coef:
        for e in range(E):
            f_e = sum(e in chosen[t] for t in counted) / (len(counted) * k)
            p_e = sum(probs[t][e] for t in counted) / len(counted)
            aux = aux + f_e * p_e
        aux = cfg.moe_aux_loss_coef * E * aux
    return torch.stack(ys), aux


def _layer_case(dist, E, k, forget, strategy, joint_update, capacity, policy, seed, mlp="swiglu", routing="free"):
    arch = "llama3" if mlp == "swiglu" else "gpt-neo"
    domains = [{"name": f"d{i}", "heads": 0, "units": 0, "experts": ex} for i, ex in enumerate(forget)]
    cfg = tiny_config(arch, strategy, two_domains=False, joint_update=joint_update,
                      model={"n_experts": E, "moe_top_k": k, "moe_capacity_factor": capacity,
                             "moe_drop_policy": policy, "bias": False,
                             **({"n_kv_heads": 2} if arch == "llama3" else {})},
                      sgtm={"domains": domains, "moe_forget_routing": routing})
    _, model = build_model(cfg, dist)
    g = torch.Generator().manual_seed(seed)
    T = 16
    modes = torch.randint(0, FORGET + len(forget), (1, T), generator=g)
    x = torch.randn(1, T, cfg.model.d_model, generator=g)
    c = torch.randn(1, T, cfg.model.d_model, generator=g)
    return cfg, model, modes, x, c


def _check_layer(dist, E, k, forget, strategy, joint_update, capacity, policy, seed, ablate_first=False,
                 mlp="swiglu", routing="free") -> list[str]:
    """Mismatches between our layer (output, every parameter's gradient, input gradient) and the
    reference with the per-class token weights."""
    cfg, model, modes, x, c = _layer_case(dist, E, k, forget, strategy, joint_update, capacity, policy, seed, mlp,
                                          routing)
    if ablate_first:
        ablate(model, [0])
    layer: MoE = model.blocks[0].mlp
    masks = model.token_masks(modes, target_modes=modes, doc_ids=torch.zeros_like(modes))
    xin = x.clone().requires_grad_(True)
    y = layer(xin, masks)
    loss = (y * c).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
    loss.backward()
    classes = layer.feature_class.tolist()
    P0 = {"router": layer.router.detach()}
    for j, ex in enumerate(layer.experts):
        P0[f"w_in{j}"], P0[f"w_out{j}"] = ex.w_in.detach(), ex.w_out.detach()
    ablated = set(range(E)) & {e for e in range(E) if ablate_first and classes[e] == 0}
    bad = []
    m = modes[0]

    def ref_grads(weight):
        P = {n: t.clone().requires_grad_(True) for n, t in P0.items()}
        xr = x[0].clone().requires_grad_(True)
        yr, aux = reference_moe(P, cfg.model, classes, xr, m, strategy, ablated, routing == "own_first")
        ((yr * c[0]).sum(-1) * weight).sum().add(aux).backward()
        return yr.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in P.items()}, xr.grad

    yr, full, gx = ref_grads(torch.ones(len(m)))
    if not torch.allclose(y.detach()[0], yr, **TOL):
        bad.append("output")
    if not torch.allclose(xin.grad[0], gx, **TOL):
        bad.append("input grad")
    by_class = {}
    for cls in {int(ParamClass.JOINT_NON_FORGET), int(ParamClass.JOINT_ALL), *classes}:
        by_class[cls] = ref_grads(_allowed(m, cls, strategy))[1]
    rc = int(layer.router.sgtm_role.classes[0])
    if not torch.allclose(layer.router.grad, by_class[rc]["router"], **TOL):
        bad.append(f"router (class {rc})")
    for j, ex in enumerate(layer.experts):
        for name, p in (("w_in", ex.w_in), ("w_out", ex.w_out)):
            if not torch.allclose(p.grad, by_class[classes[j]][f"{name}{j}"], **TOL):
                bad.append(f"expert {j} {name} (class {classes[j]})")
    return bad


@st.composite
def layer_cases(draw):
    E = draw(st.integers(3, 6))
    k = draw(st.integers(1, 2))
    n_forget = draw(st.integers(1, E - k))
    pool = list(range(E))
    random.Random(draw(st.integers(0, 999))).shuffle(pool)
    split = draw(st.integers(0, n_forget))
    forget = [sorted(pool[:split]) or [], sorted(pool[split:n_forget])]
    forget = [f for f in forget if f] or [[pool[0]]]
    strategy = draw(st.sampled_from(["sgtm", "activation_masking", "none"]))
    return dict(E=E, k=k, forget=forget, strategy=strategy,
                routing=draw(st.sampled_from(["free", "own_first"])) if strategy == "sgtm" else "free",
                joint_update=draw(st.sampled_from(["non_forget", "all"])),
                capacity=draw(st.sampled_from([None, 0.5, 1.0, 1.5])),
                policy=draw(st.sampled_from(["probs", "position"])), seed=draw(st.integers(0, 10_000)),
                ablate_first=draw(st.booleans()), mlp=draw(st.sampled_from(["swiglu", "gelu"])))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=layer_cases())
def test_moe_layer_matches_the_per_token_reference(single_process_world, case):
    """Random expert partitions (1-2 domains), top-1/2, strategies, joint policies, capacity with
    either drop policy, ablation, SwiGLU/GELU experts, free or own-first forget routing: the output,
    the input gradient, the router's
    gradient (its joint class's tokens) and each expert's gradient (its class's tokens) equal the
    reference's."""
    assert not _check_layer(single_process_world, **case)


FIXED = dict(E=4, k=2, forget=[[1], [2]], strategy="sgtm", joint_update="non_forget", capacity=0.75,
             policy="probs", seed=4)


@pytest.mark.parametrize("name,expect", [("retain_routes_to_forget", "output"),
                                         ("experts_unmasked", "expert"),
                                         ("aux_over_all_tokens", "router"),
                                         ("forget_tokens_compete", "output")])
def test_the_reference_check_fails_under_each_mutation(single_process_world, name, expect):
    """The reference comparison can fail: each deliberately broken rule is reported."""
    assert not _check_layer(single_process_world, **FIXED)
    with moe_mutation(name):
        bad = _check_layer(single_process_world, **FIXED)
    assert any(expect in b for b in bad), bad


def test_capacity_really_drops_and_forget_tokens_go_last(single_process_world):
    """The fixed case above drops assignments, and a non-forget token is only dropped at an expert
    that no forget token reached."""
    cfg, model, modes, x, _ = _layer_case(single_process_world, **{k: v for k, v in FIXED.items()})
    layer = model.blocks[0].mlp
    masks = model.token_masks(modes, target_modes=modes, doc_ids=torch.zeros_like(modes))
    logits = x[0] @ layer.router.detach().t()
    probs = logits.masked_fill(layer._blocked(masks, 16), -math.inf).softmax(-1)
    top_p, top_e = probs.topk(2, dim=-1)
    nonforget = masks.allow[int(ParamClass.JOINT_NON_FORGET)]
    keep = layer._capacity(top_p, top_e, nonforget)
    assert not keep.all()
    forget_tok = modes[0] >= FORGET
    for e in range(4):
        kept_forget = (keep & (top_e == e) & forget_tok[:, None]).any()
        dropped_nonforget = (~keep & (top_e == e) & ~forget_tok[:, None]).any()
        assert not (kept_forget and dropped_nonforget), e


def test_own_first_routing_sends_every_forget_token_to_its_experts(single_process_world):
    """sgtm.moe_forget_routing=own_first: every forget:d token's top-k holds d's expert (top-1
    included); under 'free' routing some forget token misses it (the option changes something);
    non-forget tokens route the same either way."""
    picks = {}
    for routing in ("free", "own_first"):
        cfg, model, modes, x, _ = _layer_case(single_process_world, 4, 1, [[1], [2]], "sgtm", "non_forget", None,
                                              "probs", 5, routing=routing)
        layer = model.blocks[0].mlp
        masks = model.token_masks(modes, target_modes=modes, doc_ids=torch.zeros_like(modes))
        probs = (x[0] @ layer.router.detach().t()).masked_fill(layer._blocked(masks, 16), -math.inf).softmax(-1)
        picks[routing] = layer._route(probs, masks, masks.allow[int(ParamClass.JOINT_NON_FORGET)],
                                      layer._blocked(masks, 16))[1][:, 0]
    m = modes[0]
    own = torch.where(m == FORGET, 1, torch.where(m == FORGET + 1, 2, -1))
    forget = m >= FORGET
    assert forget.sum() > 2 and torch.equal(picks["own_first"][forget], own[forget])
    assert not torch.equal(picks["free"][forget], own[forget])
    assert torch.equal(picks["free"][~forget], picks["own_first"][~forget])


def test_retain_tokens_never_reach_forget_experts_and_ablation_removes_them(single_process_world):
    """Retain-mode outputs do not depend on forget experts' weights; after ablation no token's
    output does, and the forget experts' weights are zero."""
    cfg = moe_config(shared=1)
    _, model = build_model(cfg, single_process_world)
    layer = model.blocks[0].mlp
    T = 32
    g = torch.Generator().manual_seed(0)
    modes = torch.randint(0, FORGET + 2, (1, T), generator=g)
    x = torch.randn(1, T, 32, generator=g)

    def out():
        with torch.no_grad():
            masks = model.token_masks(modes, target_modes=modes, doc_ids=torch.zeros_like(modes))
            return layer(x, masks)[0]

    forget_w = [p for ex in layer.experts for p in ex.parameters() if int(p.sgtm_role.classes[0]) >= 0]
    before = out()
    with torch.no_grad():
        for p in forget_w:
            p.add_(torch.randn(p.shape, generator=g))
    after = out()
    retain = modes[0] == RETAIN
    assert retain.sum() > 3 and torch.equal(before[retain], after[retain])
    assert not torch.equal(before[~retain], after[~retain])
    ablate(model)
    assert all(bool((p == 0).all()) for p in forget_w)
    base = out()
    with torch.no_grad():
        for p in forget_w:
            p.add_(torch.randn(p.shape, generator=g))
    assert torch.equal(base, out())


# ------------------------------------------------------------------------------ isolation property


def _moe_case(pick, n_experts: int | None = None):
    """tests/support/isolation.make_case's random partition and modes, on an MoE model: random
    experts per domain (whole experts), shared experts or not (forget units then index them),
    capacity or dropless, top-1/2."""
    case = make_case(pick)
    E = n_experts or pick(3, 6)
    k = pick(1, 2)
    shared = pick(0, 1)
    free = list(range(E))
    for dom in case.overrides["sgtm"]["domains"]:
        take = pick(0, max(0, len(free) - k - 1)) if len(free) > k else 0
        dom["experts"] = sorted(free.pop(pick(0, len(free) - 1)) for _ in range(take))
        if not shared:
            dom["units"] = []
    if case.overrides["sgtm"]["scope"] == "attention":
        for dom in case.overrides["sgtm"]["domains"]:
            dom["experts"] = []
    case.overrides["sgtm"]["moe_forget_routing"] = ("free", "own_first")[pick(0, 1)]
    case.overrides["model"].update(n_experts=E, moe_top_k=k, moe_shared_experts=shared,
                                   moe_capacity_factor=(None, 0.5, 1.0)[pick(0, 2)])
    return case


def _moe_leaks(dist, case):
    _, model = build_model(case.config(), dist)
    return isolation_leaks(model, case)


def _forget_must_change(case) -> bool:
    """Does a labelled forget position's domain own parameters its tokens certainly reach: forget
    heads, shared-expert units, or forget experts under own_first dropless routing (free routing
    or a capacity may send a forget token elsewhere)?"""
    from pipeline.sgtm.masking import position_modes

    b, sg, m = case.batch, case.overrides["sgtm"], case.overrides["model"]
    pos = position_modes(b["modes"], b["labels"], b["target_modes"])
    labelled = (pos >= FORGET) & (b["labels"] != -100)
    mlp = sg["scope"] != "attention"
    own_dropless = sg["moe_forget_routing"] == "own_first" and m["moe_capacity_factor"] is None
    for d in {int(v) - FORGET for v in pos[labelled].tolist()}:
        dom = sg["domains"][d]
        if (sg["scope"] != "mlp" and dom["heads"]) or (mlp and m["moe_shared_experts"] and dom["units"]) \
                or (mlp and own_dropless and dom.get("experts")):
            return True
    return False


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_forget_content_never_reaches_retain_gradients_of_moe_models(single_process_world, data):
    """Random MoE partitions (forget experts alone or with heads/shared-expert units, 1-3 domains,
    joint policies, capacity) and random mode layouts: changing forget tokens' content, which of
    their labels are ignored and their domain leaves every retain and joint(non_forget) gradient
    bit-identical; forget slices their tokens certainly reach do change."""
    case = _moe_case(lambda lo, hi: data.draw(st.integers(lo, hi)))
    leaked, forget_changed = _moe_leaks(single_process_world, case)
    assert not leaked, f"leak into {leaked[:5]} with {case.overrides}"
    if _forget_must_change(case):
        assert forget_changed, f"forget content changed no forget gradient with {case.overrides}"


@pytest.mark.parametrize("name", ["experts_unmasked", "aux_over_all_tokens", "forget_tokens_compete"])
def test_the_moe_isolation_check_fails_under_each_mutation(single_process_world, name):
    """The property can fail: each broken rule leaks in some random case (a fixed seed range)."""
    for seed in range(40):
        case = _moe_case(random.Random(seed).randint, n_experts=4)
        if name == "forget_tokens_compete":
            case.overrides["model"]["moe_capacity_factor"] = 0.5
        with moe_mutation(name):
            leaked, _ = _moe_leaks(single_process_world, case)
        if leaked:
            assert not _moe_leaks(single_process_world, case)[0]  # the same case is clean unmutated
            return
    raise AssertionError(f"mutation {name} never leaked in 40 random cases")


# ------------------------------------------------------------------------------ config and partition


def test_moe_config_errors_name_the_key():
    for over, match in [({"model": {"moe_top_k": 9}}, r"^model\.moe_top_k: expected 1\.\.n_experts=4"),
                        ({"sgtm": {"domains": [{"name": "es", "heads": 0, "units": 0, "experts": 3}]}},
                         r"^sgtm\.domains\[0\]\.experts: 3 forget experts leave fewer than model\.moe_top_k=2"),
                        ({"sgtm": {"domains": [{"name": "es", "heads": 0, "units": 4, "experts": 1}]}},
                         r"^sgtm\.domains\[0\]\.units: model\.n_experts=4 with model\.moe_shared_experts=0"),
                        ({"engine": {"expert_parallel": 3}}, r"^engine\.expert_parallel: 3 does not divide"),
                        ({"sgtm": {"strategy": "gradient_routing"}}, r"^sgtm\.strategy: gradient_routing")]:
        base = {"model": {"n_experts": 4}, "sgtm": {"domains": [{"name": "es", "heads": 0, "units": 0, "experts": 1}]}}
        for sec, v in over.items():
            base[sec] = {**base.get(sec, {}), **v}
        with pytest.raises(ConfigError, match=match):
            tiny_config("llama3", two_domains=False, model={"n_kv_heads": 2, **base["model"]}, sgtm=base["sgtm"],
                        engine=base.get("engine", {}))
    with pytest.raises(ConfigError, match=r"^sgtm\.domains\[0\]\.experts: forget experts need an MoE model"):
        tiny_config("llama", two_domains=False,
                    sgtm={"domains": [{"name": "es", "heads": 1, "units": 2, "experts": 1}]})


def test_llama3_moe_preset_and_committed_configs():
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs/experiments/moe_tiny.yaml")
    assert cfg.model.arch == "llama3-moe" and cfg.model.n_experts >= 2
    assert any(d.experts for d in cfg.sgtm.domains)
    assert tiny_config("llama3-moe", two_domains=False, sgtm={"domains": [{"name": "es", "heads": 0, "units": 0}]}
                       ).model.n_experts == 8


def test_partition_shows_experts_per_ep_rank(capsys):
    from pipeline.commands import partition as cli

    args = cli.argparse.Namespace(config=str(ROOT / "configs/experiments/moe_tiny.yaml"), json=False,
                                  overrides=["engine.expert_parallel=2"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "EP rank 0 (experts 0-" in out and "EP rank 1 (experts" in out
    args.json = True
    cli.run(args)
    data = json.loads(capsys.readouterr().out)
    owned = data["experts_by_ep_rank"]
    assert len(owned) == 2
    spanish = [e for row in owned for es in row["owned"].get("spanish", {}).values() for e in es]
    assert spanish and all(e in row["experts"] for row in owned for es in row["owned"].get("spanish", {}).values()
                           for e in es)


@pytest.mark.parametrize("over", [{}, {"shared": 1}, {"arch": "gpt-neo", "shared": 2}])
def test_num_params_counts_the_built_moe_model(single_process_world, over):
    """num_params (every expert, the router, the shared MLP, biases) is the built model's, tensor by
    tensor (pipeline.model.shapes)."""
    from pipeline.model.shapes import model_shapes, num_params

    cfg = moe_config(model={"vocab_size": 128}, **over)
    _, model = build_model(cfg, single_process_world)
    built = {n: (p.numel(), bool(getattr(p, "tensor_model_parallel", False))) for n, p in model.named_parameters()}
    assert built == {s.name: (s.numel, s.sharded) for s in model_shapes(cfg.model, padded=True)}
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg.model)


def test_expert_ownership_places_experts_by_rank(single_process_world):
    cfg = moe_config(ep=1)
    from pipeline.sgtm.partition import ForgetPartition

    rows = expert_ownership(ForgetPartition(cfg.model, cfg.sgtm), 2)
    assert rows[0]["experts"] == [0, 1] and rows[1]["experts"] == [2, 3]
    assert rows[0]["owned"]["es"] == {0: [1], 1: [1]} and rows[0]["owned"]["fr"] == {}
    assert rows[1]["owned"]["fr"] == {0: [2], 1: [2]} and rows[1]["owned"]["es"] == {}


# ------------------------------------------------------------------------------ expert parallelism


def scenario_moe_grads(out: Path, cases: dict[str, dict]) -> dict:
    """Per case (moe_config overrides, EP and TP from it): loss and TP=1/EP=1 gradients of a mixed
    batch; then ablation on every shard (local check), the ablated state and its loss."""
    result = {}
    for name, over in cases.items():
        cfg = moe_config(**over)
        d = init_distributed(cfg.engine)
        part, model = build_model(cfg, d)
        batch = mixed_batch(n_domains=len(cfg.sgtm.domains))
        kw = dict(labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                  target_modes=batch["target_modes"])
        loss = model(batch["input_ids"], **kw)
        loss.backward()
        state, grads = moe.gather_full_state_dict(model), moe.gather_full_state_dict(model, grads=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ablate(model, [0])
        local_ok, zeroed = True, 0
        for n, p in model.named_parameters():
            sel = p.sgtm_role.slice_mask(p, {0}).expand_as(p)
            zeroed += int(sel.sum())
            local_ok &= bool((p[sel] == 0).all()) and torch.equal(p[~sel], before[n][~sel])
        model.eval()
        with torch.no_grad():
            ablated_loss = model(batch["input_ids"], **kw)
        ablated = moe.gather_full_state_dict(model)
        flags = [None] * d.world_size
        dist.all_gather_object(flags, {"ok": local_ok, "zeroed": zeroed, "ep": ep_world(),
                                       "experts": [int(p.expert_index) for p in model.parameters()
                                                   if getattr(p, "expert_parallel", False)]})
        if d.rank == 0:
            torch.save({"state": state, "grads": grads, "loss": loss.detach(), "ablated": ablated,
                        "ablated_loss": ablated_loss}, out / f"moe_{name}.pt")
        result[name] = {"ranks": flags, "dp": [d.dp_rank, d.dp_size]}
    return result


def scenario_moe_isolation(out: Path, runs: list[dict], steps: int) -> dict:
    """Per run: three DeepSpeed runs at EP=2 that differ only in forget spans (A, B: other content;
    C: B's content unlabelled); the finals (TP=1/EP=1 view) are saved. Also whether the
    replicated parameters stayed bit-identical on the two EP ranks."""
    result = {}
    for run in runs:
        finals, replicas_equal = {}, True
        with moe_mutation(run.get("mutation")):
            for name, seed, mode in (("A", 1, Mode.FORGET), ("B", 2, Mode.FORGET), ("C", 2, Mode.UNLABELLED)):
                cfg = moe_config(ep=2, engine={"zero_stage": run.get("zero", 1), "micro_batch_size": 4,
                                               **run.get("engine", {})},
                                 optimizer={"lr": 3e-3, "weight_decay": 0.1}, train={"steps": steps},
                                 **run.get("config", {}))
                state = build_engine(cfg)
                for step in range(steps):
                    train_step(state, [isolation_batch(step, seed, mode)])
                finals[name] = moe.gather_full_state_dict(state.model)
                for _n, p in state.model.named_parameters():
                    if getattr(p, "expert_parallel", False):
                        continue
                    parts = [torch.empty_like(p.detach()) for _ in range(dist.get_world_size())]
                    dist.all_gather(parts, p.detach().contiguous())
                    replicas_equal &= all(torch.equal(parts[0], t) for t in parts)
                if state.clipper is not None and state.clipper.last_norms is not None:
                    finals[name + "_norms"] = state.clipper.last_norms.clone()
        if dist.get_rank() == 0:
            torch.save({"finals": finals}, out / f"moe_isolation_{run['name']}.pt")
        result[run["name"]] = {"replicas_equal": replicas_equal}
    return result


# One launch of 4 ranks: EP=2 x DP=2 (EP groups {0, 1} and {2, 3}), then EP=2 x TP=2 (the EP group
# is the TP group), both with a shared expert and binding capacity.
EP_CASES = {"ep2_dp2": {"ep": 2, "shared": 1, "capacity": 0.75},
            "ep2_tp2": {"ep": 2, "tp": 2, "shared": 1, "capacity": 0.75}}


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2")
    return out, run_scenario(4, scenario_moe_grads, out, timeout=900, cases=EP_CASES)


@pytest.mark.parallel
@pytest.mark.parametrize("name", list(EP_CASES))
def test_ep2_loss_gradients_and_ablation_equal_ep1(single_process_world, ep2, name):
    """Two EP ranks (experts 0-1 / 2-3, forget[es] on rank 0, forget[fr] on rank 1, tokens split
    and dispatched by all-to-all), beside DP=2 or inside TP=2, give the loss and every gradient of
    one process (per tensor relative to its scale, tests/support/compare.py); ablation on each shard zeroes
    exactly its forget slices and equals ablation at EP=1 (state and ablated loss)."""
    from pipeline.model.moe import load_full_state_dict

    out, result = ep2
    saved = torch.load(out / f"moe_{name}.pt", weights_only=True)
    ranks = result[name]["ranks"]
    assert [r["ep"] for r in ranks] == [[0, 2], [1, 2]] * 2 and result[name]["dp"] == [0, 2]
    assert all(sorted(set(r["experts"])) == ([0, 1] if i % 2 == 0 else [2, 3]) for i, r in enumerate(ranks))
    assert all(r["ok"] and r["zeroed"] > 0 for r in ranks)
    over = {k: v for k, v in EP_CASES[name].items() if k != "ep"}
    _, model = build_model(moe_config(**over), single_process_world)
    load_full_state_dict(model, saved["state"])
    b = mixed_batch(n_domains=2)
    kw = dict(labels=b["labels"], modes=b["modes"], doc_ids=b["doc_ids"], target_modes=b["target_modes"])
    loss = model(b["input_ids"], **kw)
    loss.backward()
    assert_equivalent(saved["loss"], loss, "loss")
    assert set(saved["grads"]) == {n for n, _ in model.named_parameters()}
    assert_all_equivalent(saved["grads"], {n: p.grad for n, p in model.named_parameters()})
    ablate(model, [0])
    for n, p in model.named_parameters():
        assert torch.equal(saved["ablated"][n], p.detach()), n
    model.eval()
    with torch.no_grad():
        assert_equivalent(saved["ablated_loss"], model(b["input_ids"], **kw), "ablated loss")


CLIP = {"grad_clip": 0.05}


def _leaks(saved, cfg, dist):
    A, B, C = (saved["finals"][k] for k in "ABC")
    _, full = build_model(cfg, dist)
    return slice_changes(full, A, B, C)


@pytest.mark.parallel
def test_isolation_invariant_through_deepspeed_at_ep2(single_process_world, tmp_path):
    """6 DeepSpeed steps at EP=2 (ZeRO-1, binding per-partition clipping, a shared expert with
    forget units, capacity drops): changing the forget spans' content leaves every retain and
    joint(non_forget) parameter bit-identical, forget parameters differ, making the spans
    unlabelled changes retain parameters, and the replicated parameters stay equal on both EP
    ranks, and the run equals the same steps at EP=1 in one process (parameters, clip norms).
    Letting retain tokens route to forget experts (a mutation) leaks over the steps."""
    config = {"shared": 1, "capacity": 1.0}
    runs = [{"name": "ok", "engine": CLIP, "config": config},
            {"name": "mutated", "engine": CLIP, "config": config, "mutation": "retain_routes_to_forget"}]
    result = run_scenario(2, scenario_moe_isolation, tmp_path, timeout=900, runs=runs, steps=6)
    cfg = moe_config(**config)
    ok = torch.load(tmp_path / "moe_isolation_ok.pt", weights_only=True)
    leaked, forget_changed, retain_changed_c = _leaks(ok, cfg, single_process_world)
    assert not leaked, leaked
    assert forget_changed > 0 and retain_changed_c > 0
    assert result["ok"]["replicas_equal"] and result["mutated"]["replicas_equal"]
    norms = ok["finals"]["A_norms"]
    assert bool((norms[norms > 0] > CLIP["grad_clip"]).all())  # the clip bound
    mutated = torch.load(tmp_path / "moe_isolation_mutated.pt", weights_only=True)
    assert _leaks(mutated, cfg, single_process_world)[0]
    # The same 6 steps in one process at EP=1 (DeepSpeed ZeRO-1, the same clipping): the EP=2 run's
    # final parameters and last clip norms (experts counted once per EP group) match.
    one = moe_config(engine={"zero_stage": 1, "micro_batch_size": 4, **CLIP},
                     optimizer={"lr": 3e-3, "weight_decay": 0.1}, train={"steps": 6}, **config)
    state = build_engine(one)
    for step in range(6):
        train_step(state, [isolation_batch(step, 1, Mode.FORGET)])
    assert_equivalent(norms, state.clipper.last_norms, "clip norms")
    assert_all_equivalent(ok["finals"]["A"], {n: p.detach() for n, p in state.model.named_parameters()},
                          scale=SCALE_AFTER_STEPS)
