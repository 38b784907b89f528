"""Per-token exactness of every strategy against an independent reference, and the isolation
property over random partitions and random mode layouts (TP=1, one process)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import codes
from pipeline.codes import Mode, ParamClass
from pipeline.engine.engine import build_model
from pipeline.model.tp_state import gather_full_state_dict
from pipeline.sgtm import masking
from tests.support import reference_model
from tests.support.batches import mixed_batch
from tests.support.configs import tiny_config
from tests.support.isolation import forget_reaches_its_parameters, isolation_leaks, make_case
from tests.support.isolation import gradients as isolation_gradients

TOL = dict(rtol=1e-4, atol=1e-6)


def _ours(cfg, dist, batch):
    part, model = build_model(cfg, dist)
    loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                 target_modes=batch.get("target_modes"))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    roles = {n: p.sgtm_role for n, p in model.named_parameters()}
    return part, model, loss.detach(), grads, roles


def _ref_grads(cfg, part, state, batch, token_weight, **flags):
    """Gradients of sum_t token_weight[t] * loss_t / (B x S) on the reference model."""
    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    heads = [part.head_class(layer) for layer in range(cfg.model.n_layers)]
    units = [part.unit_class(layer) for layer in range(cfg.model.n_layers)]
    per_tok = reference_model.per_token_loss(params, cfg.model, heads, units, batch["input_ids"], batch["labels"],
                                             batch["modes"], batch["doc_ids"], target_modes=batch.get("target_modes"),
                                             **flags)
    n = batch["labels"].numel()  # the objective divides by B x S (pipeline.model.transformer.training_loss)
    loss = (per_tok * token_weight).sum() / n
    loss.backward()
    return (per_tok.sum() / n).detach(), {k: p.grad for k, p in params.items()}


def _allowed_tokens(pos_modes, cls, strategy):
    """Which positions may update a class, spelled out per strategy (independently of codes.MAY_UPDATE)."""
    non_forget = pos_modes < Mode.FORGET
    everyone = torch.ones_like(pos_modes, dtype=torch.float)
    if strategy == "none" or cls == ParamClass.JOINT_ALL:
        return everyone
    if cls == ParamClass.JOINT_NON_FORGET:
        return non_forget.float()
    if strategy != "sgtm":
        return everyone
    if cls == ParamClass.RETAIN:
        return non_forget.float()
    return (non_forget | (pos_modes == Mode.FORGET + cls)).float()


@pytest.mark.parametrize("arch", ["gpt-neo", "llama"])
@pytest.mark.parametrize("strategy", ["sgtm", "none", "activation_masking", "gradient_routing"])
@pytest.mark.parametrize("joint_update", ["non_forget", "all"])
@pytest.mark.parametrize("cross_mode", ["segment", "detached_context"])
def test_every_slice_matches_the_per_class_reference(single_process_world, arch, strategy, joint_update, cross_mode):
    """Each slice's gradient equals the reference gradient of the loss over the positions its class
    may learn from, with modes changing inside documents; the attention rule, the position modes
    at span edges and the joint policies (honoured by every strategy) are the reference's own."""
    cfg = tiny_config(arch, strategy, joint_update=joint_update, sgtm={"cross_mode_attention": cross_mode})
    batch = mixed_batch()
    part, model, loss, grads, roles = _ours(cfg, single_process_world, batch)
    state = gather_full_state_dict(model)
    pos = reference_model.reference_position_modes(batch["modes"], batch["labels"], batch["target_modes"])
    flags = dict(act_mask=strategy in ("sgtm", "activation_masking"), route=strategy == "gradient_routing",
                 mode_aware=strategy != "none", detached_context=cross_mode == "detached_context")
    classes = sorted({int(c) for r in roles.values() for c in r.classes})
    ref_by_class = {}
    for cls in classes:
        weight = _allowed_tokens(pos if strategy != "none" else batch["modes"], cls, strategy)
        ref_loss, ref_by_class[cls] = _ref_grads(cfg, part, state, batch, weight, **flags)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, g in grads.items():
        role = roles[name]
        for cls in {int(c) for c in role.classes}:
            sel = role.slice_mask(g, {cls}).expand_as(g)
            torch.testing.assert_close(g[sel], ref_by_class[cls][name][sel], **TOL,
                                       msg=lambda m, n=name, c=cls: f"{n} class {c}: {m}")
    if strategy == "sgtm":  # the test can fail: unmasked retain gradients differ from the masked ones
        _, unmasked = _ref_grads(cfg, part, state, batch, torch.ones_like(batch["labels"], dtype=torch.float),
                                 **flags)
        w = "blocks.0.mlp.fc2.weight"
        sel = roles[w].slice_mask(grads[w], {ParamClass.RETAIN}).expand_as(grads[w])
        assert not torch.allclose(grads[w][sel], unmasked[w][sel], **TOL)


def test_reference_attention_rule_is_not_vacuous(single_process_world):
    """Inside-document mode changes really change the attention (else the tests above prove nothing)."""
    batch = mixed_batch()
    pos = reference_model.reference_position_modes(batch["modes"], batch["labels"], batch["target_modes"])
    live, det = reference_model.reference_attention(pos, batch["doc_ids"], True, True)
    plain, _ = reference_model.reference_attention(pos, batch["doc_ids"], False, False)
    assert (plain & ~live).any() and det.any()
    # A non-forget position whose target is a forget token is trained as forget.
    assert ((batch["modes"] < Mode.FORGET) & (pos >= Mode.FORGET)).any()


def test_every_parameter_is_classified(single_process_world):
    cfg = tiny_config("llama")
    _, model = build_model(cfg, single_process_world)
    for name, p in model.named_parameters():
        role = getattr(p, "sgtm_role", None)
        assert role is not None, name
        if role.split_dim is not None:
            assert role.classes.numel() == p.shape[role.split_dim], name
    kinds = {p.sgtm_role.kind for p in model.parameters()}
    assert {"embedding", "norm", "final_norm", "lm_head", "qkv", "attn_out", "mlp_in", "mlp_out"} <= kinds


# ------------------------------------------------------------------------------ isolation property


def _check_case(dist, case) -> tuple[list[str], list[str]]:
    _, model = build_model(case.config(), dist)
    return isolation_leaks(model, case)


@st.composite
def isolation_cases(draw):
    return make_case(lambda lo, hi: draw(st.integers(lo, hi)))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=isolation_cases())
def test_forget_content_never_reaches_retain_or_non_forget_joint_gradients(single_process_world, case):
    """Random partitions (1-3 domains, heads/units/blocks, attention- or MLP-only, joint policies,
    both families, both cross-mode attentions), random documents and random mode runs (changes
    inside documents, at document edges, at the first position and the last target): changing
    forget tokens' inputs and targets leaves every retain and joint(non_forget) gradient
    bit-identical, and forget slices do change."""
    leaked, forget_changed = _check_case(single_process_world, case)
    assert not leaked, f"leak into {leaked[:5]} with {case.overrides}"
    if forget_reaches_its_parameters(case):
        assert forget_changed, f"forget content changed no forget gradient with {case.overrides}"


def _leaking_case(dist):
    """A fixed case from the generator whose forget content reaches its parameters."""
    for seed in range(50):
        rng = random.Random(seed)
        case = make_case(rng.randint)
        if forget_reaches_its_parameters(case):
            return case
    raise AssertionError("no case with labelled forget positions in 50 seeds")


def test_the_isolation_check_reports_a_leak_when_masking_is_disabled_for_retain(single_process_world, monkeypatch):
    """The property test can fail: let every token update retain slices and it reports a leak."""
    case = _leaking_case(single_process_world)
    assert not _check_case(single_process_world, case)[0]
    rules = dict(codes.MAY_UPDATE["sgtm"], retain=codes.ALL_TOKENS)
    monkeypatch.setitem(codes.MAY_UPDATE, "sgtm", rules)
    leaked, _ = _check_case(single_process_world, case)
    assert any("class -1" in n for n in leaked), leaked


def test_the_isolation_check_reports_a_leak_when_attention_crosses_modes(single_process_world, monkeypatch):
    """...and a plain document-causal attention (the first wave's) leaks through attention."""
    from pipeline.sgtm import masking

    real = masking.attention_masks

    def document_only(pos_modes, doc_ids, cross_mode):
        return real(None, doc_ids, cross_mode)

    found = False
    for seed in range(30):
        rng = random.Random(seed)
        case = make_case(rng.randint)
        monkeypatch.setattr(masking, "attention_masks", document_only)
        leaked, _ = _check_case(single_process_world, case)
        monkeypatch.setattr(masking, "attention_masks", real)
        if leaked:
            found = True
            break
    assert found, "document-only attention never leaked in 30 random cases"


def test_the_isolation_check_reports_a_leak_without_target_modes(single_process_world):
    """Position modes matter: dropping ``target_modes`` (last target assumed to share its input's
    mode) leaks when the last position predicts a forget token."""
    from tests.support.isolation import isolation_leaks as check

    for seed in range(200):
        rng = random.Random(seed)
        case = make_case(rng.randint)
        b = case.batch
        edge = (b["modes"][:, -1] < Mode.FORGET) & (b["target_modes"][:, -1] >= Mode.FORGET) \
            & (b["labels"][:, -1] != -100)
        if edge.any():
            break
    else:
        raise AssertionError("no case with a forget target at the last position")
    for b in (case.batch, case.changed):
        b["target_modes"] = None
    _, model = build_model(case.config(), single_process_world)
    leaked, _ = check(model, case)
    assert leaked


def test_the_isolation_check_reports_the_count_channel(single_process_world, monkeypatch):
    """The count channel: dividing the loss by the number of labelled positions (forget ones
    included) scales every retain gradient by a count the forget labels decide; the cases vary
    which forget labels are ignored, so the property reports it."""
    from pipeline.model import transformer

    monkeypatch.setattr(transformer, "training_loss", lambda t: t.sum() / (t != 0).sum().clamp(min=1))
    found = 0
    for seed in range(20):
        case = make_case(random.Random(seed).randint)
        pos = [masking.position_modes(b["modes"], b["labels"], b["target_modes"]) for b in (case.batch, case.changed)]
        counts = [int((b["labels"] != -100).sum()) for b in (case.batch, case.changed)]
        if counts[0] != counts[1] and torch.equal(pos[0] < Mode.FORGET, pos[1] < Mode.FORGET):
            found += bool(_check_case(single_process_world, case)[0])
    assert found >= 3, f"the old denominator leaked in only {found} of 20 cases"


def _forget_positions(batch: dict) -> torch.Tensor:
    return masking.position_modes(batch["modes"], batch["labels"], batch["target_modes"]) >= Mode.FORGET


def _poisoned_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    """Gradients with every forget position's embedding output set to +inf (a bf16 overflow, a
    bad shard): what each non-finite value at a forget position can reach."""
    hot = _forget_positions(batch)[..., None]
    handle = model.embedding.register_forward_hook(lambda m, i, out: out.masked_fill(hot, float("inf")))
    try:
        return isolation_gradients(model, batch)
    finally:
        handle.remove()


def _nonfinite_leaks(model, batch: dict) -> list[str]:
    """Retain / joint(non_forget) slices whose gradient is not finite or not bit-identical once
    the forget positions are poisoned."""
    clean, poisoned = isolation_gradients(model, batch), _poisoned_gradients(model, batch)
    out = []
    for name, p in model.named_parameters():
        for cls in (ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET):
            sel = p.sgtm_role.slice_mask(p, {int(cls)}).expand_as(p)
            if not bool(sel.any()) or name not in clean:
                continue
            a, b = clean[name][sel], poisoned[name][sel]
            if not (bool(torch.isfinite(b).all()) and torch.equal(a, b)):
                out.append(f"{name}[class {int(cls)}]")
    return out


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=isolation_cases())
def test_an_inf_at_forget_positions_leaves_retain_gradients_finite_and_identical(single_process_world, case):
    """0 x inf: masks select (torch.where), and attention's inputs and output gradient keep
    non-finite entries out of the kernel, so +inf in every forget position's residual stream
    leaves every retain and joint(non_forget) gradient finite and bit-identical."""
    _, model = build_model(case.config(), single_process_world)
    if bool(_forget_positions(case.batch).any()):
        leaked = _nonfinite_leaks(model, case.batch)
        assert not leaked, f"non-finite forget values reached {leaked[:5]} with {case.overrides}"


@pytest.mark.parametrize("mutation", ["multiply", "no_finite_attention"])
def test_the_inf_check_fails_when_masks_multiply(single_process_world, monkeypatch, mutation):
    """The check above can fail: masks that multiply by 0/1 (0 x inf = NaN), or attention that
    takes non-finite keys/values into the kernel, let the poison through."""
    from pipeline.model import transformer

    if mutation == "multiply":
        monkeypatch.setattr(masking, "select", lambda t, keep: t * keep)
    else:
        monkeypatch.setattr(transformer, "finite_only", lambda t: t)
    for seed in range(10):
        case = make_case(random.Random(seed).randint)
        if bool(_forget_positions(case.batch).any()):
            _, model = build_model(case.config(), single_process_world)
            assert _nonfinite_leaks(model, case.batch), f"{mutation}: no leak in case {seed}"
            return
    raise AssertionError("no case with forget positions")


# ------------------------------------------------------------------------------ retain-mode forward


def test_retain_mode_outputs_do_not_depend_on_forget_parameters(single_process_world):
    """Retain-mode positions never read features forget parameters computed, through attention
    included: perturbing every forget slice leaves their losses bit-identical."""
    cfg = tiny_config("gpt-neo", "sgtm")
    batch = mixed_batch()
    _, model = build_model(cfg, single_process_world)

    def per_token():
        with torch.no_grad():
            return model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                         target_modes=batch["target_modes"], return_per_token=True)

    from pipeline.sgtm.masking import position_modes

    pos = position_modes(batch["modes"], batch["labels"], batch["target_modes"])
    retain = pos == Mode.RETAIN
    assert retain.sum() > 4
    before = per_token()
    with torch.no_grad():
        for p in model.parameters():
            sel = p.sgtm_role.slice_mask(p, {0, 1}).expand_as(p)
            p[sel] += torch.randn(int(sel.sum()))
    after = per_token()
    assert torch.equal(before[retain], after[retain])
    assert not torch.equal(before[~retain], after[~retain])


# ------------------------------------------------------------------------------ one-line errors


def test_a_mode_outside_the_domains_is_a_one_line_error(single_process_world):
    cfg = tiny_config("gpt-neo", "sgtm")  # two domains: modes 0..3
    _, model = build_model(cfg, single_process_world)
    batch = mixed_batch()
    batch["modes"][1, 2] = Mode.FORGET + 2
    with pytest.raises(ValueError, match=r"^batch modes: mode 4 is outside \[0, 4\)") as e:
        model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"])
    assert "\n" not in str(e.value)
    batch = mixed_batch()
    batch["target_modes"][0, -1] = -1  # the last target is not also an input position
    with pytest.raises(ValueError, match=r"^batch target_modes: mode -1"):
        model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
              target_modes=batch["target_modes"])


def test_modes_without_doc_ids_are_refused_while_document_masking_is_on(single_process_world):
    batch = mixed_batch()
    _, model = build_model(tiny_config("gpt-neo", "sgtm"), single_process_world)
    with pytest.raises(ValueError, match=r"^batch: 'modes' given without 'doc_ids'.*model.document_masking"):
        model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"])
    _, model = build_model(tiny_config("gpt-neo", "sgtm", model={"document_masking": False}), single_process_world)
    assert torch.isfinite(model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"]))

