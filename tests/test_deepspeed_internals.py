"""Every hook of pipeline/backend/deepspeed_internals.py on the real DeepSpeed engine (tiny model,
one-process gloo world), the guards built on them (version, clipper-ran, clip-hook refusals),
and the clip groups: a forget gradient's size never sets the retain group's clip coefficient."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline import codes
from pipeline.backend import deepspeed_internals as dsi
from pipeline.codes import ClipGroup, Mode, ParamClass
from pipeline.components import clipping
from pipeline.engine import engine as engine_mod
from pipeline.engine.engine import build_engine, train_step
from pipeline.engine.trainer import ClipperNotRunError, to_device
from tests.support.configs import SEQ, VOCAB, tiny_config

ROW_MODES = [Mode.RETAIN, Mode.RETAIN, Mode.UNLABELLED, Mode.FORGET, Mode.FORGET + 1, Mode.FORGET]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """One mode per row (rows are independent documents): retain, unlabelled and both forget domains."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(ROW_MODES), SEQ + 1), generator=g)
    modes = torch.tensor([int(m) for m in ROW_MODES]).repeat_interleave(SEQ).view(len(ROW_MODES), SEQ)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "modes": modes,
            "doc_ids": torch.zeros_like(modes)}


def _state(zero: int = 1, clip: float = 0.0, precision: str = "fp32", joint_update: str = "non_forget"):
    """Constant LR and no weight decay, so a step with zero gradients changes nothing."""
    cfg = tiny_config("gpt-neo", "sgtm", tp=1, joint_update=joint_update,
                      engine={"zero_stage": zero, "micro_batch_size": len(ROW_MODES), "grad_clip": clip,
                              "precision": precision},
                      optimizer={"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0},
                      train={"steps": 10})
    return build_engine(cfg)


def _backward(state, batch: dict) -> None:
    mb = to_device(batch, state.dist.device)
    loss = state.engine(mb["input_ids"], labels=mb["labels"], modes=mb["modes"], doc_ids=mb["doc_ids"])
    state.engine.backward(loss)


def _weights(state) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in state.model.named_parameters()}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ version


@pytest.mark.parametrize("version", ["0.19.7", "0.19.9", "0.20.0", "1.0.0", "not-a-version"])
def test_unsupported_deepspeed_version_is_one_line_naming_it_and_the_range(version):
    with pytest.raises(dsi.DeepSpeedVersionError) as info:
        dsi.check_version(version)
    msg = _one_line(info)
    assert f"deepspeed {version} is installed" in msg and dsi.SUPPORTED in msg


def test_installed_and_pinned_versions_are_supported():
    assert dsi.check_version() == dsi.installed_version() == "0.19.8"
    assert dsi.check_version("0.19.8+cpu") == "0.19.8+cpu"  # a local build of the same release


def test_build_engine_refuses_an_unsupported_deepspeed_before_building(single_process_world, monkeypatch):
    monkeypatch.setattr(dsi, "installed_version", lambda: "0.20.1")
    built = []
    monkeypatch.setattr(engine_mod, "build_model", lambda *a: built.append(a))
    with pytest.raises(dsi.DeepSpeedVersionError) as info:
        build_engine(tiny_config())
    assert "deepspeed 0.20.1 is installed" in _one_line(info) and not built


# ---------------------------------------------------------------------------- ZeRO gradients


@pytest.mark.parametrize("zero", [1, 2])
def test_gradient_fragments_are_the_full_gradients_of_each_parameter(single_process_world, zero):
    """One rank holds the whole partition: each parameter's fragment starts at 0, has all its
    elements, and equals the ZeRO-0 engine's ``param.grad`` for the same model and batch."""
    ref = _state(zero=0)
    _backward(ref, _batch())
    expected = {id_: p.grad.reshape(-1).clone() for id_, p in enumerate(ref.model.parameters())}
    state = _state(zero=zero)
    assert dsi.holds_gradient_partition(state.engine.optimizer)
    assert not dsi.holds_gradient_partition(ref.engine.optimizer)
    _backward(state, _batch())
    frags = dsi.gradient_fragments(state.engine.optimizer)
    index = {id(p): i for i, p in enumerate(state.model.parameters())}
    assert sorted(index[id(p)] for p, _, _ in frags) == sorted(index.values())
    for p, frag, start in frags:
        assert start == 0 and frag.numel() == p.numel()
        torch.testing.assert_close(frag, expected[index[id(p)]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero", [1, 2])
def test_wrap_before_optimizer_clip_runs_once_on_the_gradients_the_update_uses(single_process_world, zero):
    """The wrapped function runs once per applied step, and what it does to the fragments is what
    the optimizer applies: zeroing them leaves every weight unchanged (no weight decay, Adam
    from zero moments); without the wrap the same step moves the weights."""
    state = _state(zero=zero)
    opt = state.engine.optimizer
    calls = []

    def zero_all(o):
        calls.append(o)
        for _, frag, _ in dsi.gradient_fragments(o):
            frag.zero_()

    dsi.wrap_before_optimizer_clip(opt, zero_all)
    with pytest.raises(RuntimeError, match="already wrapped"):
        dsi.wrap_before_optimizer_clip(opt, zero_all)
    before = _weights(state)
    train_step(state, [_batch()])
    assert calls == [opt]
    assert all(torch.equal(before[n], w) for n, w in _weights(state).items())
    dsi.unwrap_optimizer_clip(opt)
    train_step(state, [_batch()])
    assert len(calls) == 1 and not all(torch.equal(before[n], w) for n, w in _weights(state).items())


def test_wrap_before_optimizer_clip_refuses_a_non_zero_optimizer(single_process_world):
    state = _state(zero=0)
    with pytest.raises(TypeError, match="not a ZeRO-1/2 optimizer"):
        dsi.wrap_before_optimizer_clip(state.engine.optimizer, lambda o: None)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_local_gradients_cover_every_element_and_show_a_nan(single_process_world, zero):
    state = _state(zero=zero)
    _backward(state, _batch())
    grads = dsi.local_gradients(state.engine)
    assert sum(g.numel() for g in grads) == sum(p.numel() for p in state.model.parameters())
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    state.engine.step()
    mb = _batch(1)
    loss = state.engine(mb["input_ids"], labels=mb["labels"], modes=mb["modes"], doc_ids=mb["doc_ids"])
    loss.register_hook(lambda g: g * float("nan"))
    state.engine.backward(loss)
    assert not all(bool(torch.isfinite(g).all()) for g in dsi.local_gradients(state.engine))


# -------------------------------------------------------------------------------- skip a step


@pytest.mark.parametrize("zero, precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (1, "bf16")])
def test_skip_step_leaves_no_trace_but_the_schedule(single_process_world, zero, precision):
    """After a real step (so Adam moments are not zero), a skipped step leaves the weights
    bit-identical, drops its gradients and advances the LR schedule by one; the next step then
    equals the same step taken by an engine that never saw the skipped batch (so neither the
    moments nor Adam's step count moved)."""
    state, ref = _state(zero=zero, precision=precision), _state(zero=zero, precision=precision)
    for s in (state, ref):
        train_step(s, [_batch(0)])
    before = _weights(state)
    sched = state.engine.lr_scheduler.last_epoch
    _backward(state, _batch(1))
    dsi.skip_step(state.engine)
    assert all(torch.equal(before[n], w) for n, w in _weights(state).items())
    assert dsi.local_gradients(state.engine) == []
    assert state.engine.lr_scheduler.last_epoch == sched + 1
    train_step(state, [_batch(2)])
    train_step(ref, [_batch(2)])
    after, expected = _weights(state), _weights(ref)
    assert all(torch.equal(expected[n], w) for n, w in after.items())
    assert not all(torch.equal(before[n], w) for n, w in after.items())


# ----------------------------------------------------------------- refusals: clip would not run


def test_clip_config_refusals_are_one_line_naming_the_key():
    ok = {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}}}
    dsi.check_clip_config(ok)
    for zero, key in [({"compute_grad_norm": False}, "zero_optimization.compute_grad_norm"),
                      ({"offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_optimizer"),
                      ({"zenflow": {"topk_ratio": 0.1}}, "zero_optimization.zenflow")]:
        with pytest.raises(dsi.ClipHookError) as info:
            dsi.check_clip_config({"zero_optimization": {"stage": 1, **zero}})
        assert _one_line(info).startswith(key) and "engine.clip_mode=per_partition" in str(info.value)


def _with_compute_grad_norm_off(monkeypatch) -> None:
    real = engine_mod.deepspeed_config

    def config(cfg, dist):
        ds = real(cfg, dist)
        ds["zero_optimization"]["compute_grad_norm"] = False
        return ds

    monkeypatch.setattr(engine_mod, "deepspeed_config", config)


def test_compute_grad_norm_off_is_refused_at_build_and_really_skips_the_hook(single_process_world, monkeypatch):
    """With DeepSpeed's norm computation off, ``scaled_global_norm`` is never called (so the
    clipper would silently not run): build_engine refuses it; so does the check on a built engine."""
    _with_compute_grad_norm_off(monkeypatch)
    with pytest.raises(dsi.ClipHookError) as info:
        _state(zero=1, clip=0.05)
    assert _one_line(info).startswith("zero_optimization.compute_grad_norm")
    state = _state(zero=1, clip=0.0)  # no clipping asked: nothing to refuse
    calls = []
    dsi.wrap_before_optimizer_clip(state.engine.optimizer, calls.append)
    train_step(state, [_batch()])
    assert calls == []  # the reason for the refusal
    with pytest.raises(dsi.ClipHookError) as info:
        dsi.require_clip_hook(state.engine)
    assert _one_line(info).startswith("zero_optimization.compute_grad_norm")


def test_bf16_zero0_optimizer_is_refused_for_per_partition_clipping(single_process_world):
    with pytest.raises(ValueError) as info:
        _state(zero=0, clip=0.05, precision="bf16")
    assert _one_line(info).startswith("engine.clip_mode")
    state = _state(zero=0, clip=0.0, precision="bf16")  # DeepSpeed's fp16/bf16 wrapper, grads out of reach
    with pytest.raises(dsi.ClipHookError) as info:
        dsi.require_clip_hook(state.engine)
    assert _one_line(info).startswith("engine.clip_mode")
    dsi.require_clip_hook(_state(zero=0).engine)  # fp32 ZeRO-0: a plain torch optimizer, param.grad
    dsi.require_clip_hook(_state(zero=1, precision="bf16").engine)


# --------------------------------------------------------------------------- clipper-ran guard


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_a_step_where_the_clipper_did_not_run_raises(single_process_world, monkeypatch, zero):
    """Mutation: unhook the clipper (ZeRO-1/2: DeepSpeed's own ``scaled_global_norm`` back;
    ZeRO-0: the direct call does nothing) and the next step raises one line naming the step."""
    state = _state(zero=zero, clip=0.05)
    train_step(state, [_batch(0)], step=1)
    assert state.clipper.runs == 1
    if zero:
        dsi.unwrap_optimizer_clip(state.engine.optimizer)
    else:
        monkeypatch.setattr(state.clipper, "clip_param_grads", lambda: None)
    with pytest.raises(ClipperNotRunError) as info:
        train_step(state, [_batch(1)], step=2)
    assert _one_line(info).startswith("step 2: engine.clip_mode=per_partition, but the clipper ran 0 times")


# --------------------------------------------------------------------------------- checkpoints


def test_checkpoint_write_wrap_sees_every_write_and_restores(single_process_world, tmp_path):
    state = _state(zero=1)
    train_step(state, [_batch()])
    engine = state.engine
    ce = engine.checkpoint_engine
    original_save = ce.save
    seen = []

    def guard(name, fn, target):
        def wrapped(*args, **kwargs):
            seen.append((name, str(target(*args, **kwargs))))
            return fn(*args, **kwargs)
        return wrapped

    restore = dsi.wrap_checkpoint_writes(engine, guard)
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    restore()
    saved = {target for name, target in seen if name == "save"}
    files = {str(p) for p in (tmp_path / "t").glob("*.pt")}
    assert files and saved == files  # every state file DeepSpeed wrote went through the guard
    assert any(name == "makedirs" for name, _ in seen)
    assert ce.save == original_save and "_copy_recovery_script" not in vars(engine)
    n = len(seen)
    engine.save_checkpoint(str(tmp_path), tag="u", save_latest=False)
    assert len(seen) == n  # restored: the guard is no longer called

    loaded = []

    def load(path, map_location=None):
        loaded.append(str(path))
        with torch.serialization.safe_globals(dsi.checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    dsi.set_checkpoint_loader(engine, load)
    engine.load_checkpoint(str(tmp_path), tag="t", load_optimizer_states=True)
    assert set(loaded) == files


def test_checkpoint_safe_globals_are_needed_and_enough(single_process_world, tmp_path):
    state = _state(zero=1)
    train_step(state, [_batch()])
    state.engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    optim = sorted((tmp_path / "t").glob("*optim_states.pt"))
    assert optim
    for f in optim:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(f, weights_only=True)
        with torch.serialization.safe_globals(dsi.checkpoint_safe_globals()):
            assert "optimizer_state_dict" in torch.load(f, weights_only=True)


# ------------------------------------------------------------------ clip groups (issue 11, item 2)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``weight`` (broadcast) on the way back."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def _clip_after_scaled_forget_grads(scale: float, zero: int):
    """One step with joint_update=all and a clip that binds, where the logits' gradient at
    forget-mode positions is multiplied by ``scale``: returns the clipper and the weights after."""
    state = _state(zero=zero, clip=1e-3, joint_update="all")
    batch = _batch()
    weight = torch.where(batch["modes"] >= Mode.FORGET, scale, 1.0)[..., None]
    state.model.lm_head.register_forward_hook(lambda m, args, out: _ScaleGrad.apply(out, weight))
    train_step(state, [batch])
    return state.clipper, state.model


def _retain_mask(p: torch.Tensor) -> torch.Tensor:
    return p.sgtm_role.slice_mask(p, {int(ParamClass.RETAIN), int(ParamClass.JOINT_NON_FORGET)}).expand_as(p)


@pytest.mark.parametrize("zero", [0, 1])
def test_forget_gradient_size_cannot_set_the_retain_clip_coefficient(single_process_world, zero):
    """joint_update=all (embeddings, norms, LM head updated by forget tokens too): multiplying the
    forget tokens' gradient by 1000 changes the joint(all) and forget norms but leaves the retain
    group's norm and coefficient, and every retain weight after the step, bit-identical."""
    (c1, m1), (c2, m2) = (_clip_after_scaled_forget_grads(s, zero) for s in (1.0, 1000.0))
    assert ClipGroup.JOINT_ALL in c1.groups
    assert c1.coefficient(ClipGroup.RETAIN) < 1.0  # the clip binds
    assert c1.coefficient(ClipGroup.RETAIN) == c2.coefficient(ClipGroup.RETAIN)
    assert c1.coefficient(ClipGroup.JOINT_ALL) != c2.coefficient(ClipGroup.JOINT_ALL)
    assert c1.coefficient(ClipGroup.FORGET) != c2.coefficient(ClipGroup.FORGET)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        keep = _retain_mask(p1)
        assert torch.equal(p1.detach()[keep], p2.detach()[keep])


def test_joint_all_in_the_retain_group_would_leak_the_forget_gradient_size(single_process_world, monkeypatch):
    """Mutation: put joint(all) back into the retain group; the check above then fails."""
    monkeypatch.setattr(clipping, "clip_group",
                        lambda c: ClipGroup.RETAIN if c == ParamClass.JOINT_ALL else codes.clip_group(c))
    (c1, _), (c2, _) = (_clip_after_scaled_forget_grads(s, 1) for s in (1.0, 1000.0))
    assert ClipGroup.JOINT_ALL not in c1.groups
    assert c1.coefficient(ClipGroup.RETAIN) != c2.coefficient(ClipGroup.RETAIN)


def test_clip_groups_and_their_metric_names():
    assert [codes.clip_group(c) for c in (ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET, ParamClass.JOINT_ALL,
                                          0, 1)] == [ClipGroup.RETAIN, ClipGroup.RETAIN, ClipGroup.JOINT_ALL,
                                                     ClipGroup.FORGET, ClipGroup.FORGET + 1]
    assert [clipping.group_name(g) for g in (ClipGroup.RETAIN, ClipGroup.JOINT_ALL, ClipGroup.FORGET + 1)] == \
        ["retain", "joint_all", "forget1"]


def test_shm_build_is_skipped_on_cpu(single_process_world):
    """init_distributed on CPU replaced DeepSpeed's JIT build of its shared-memory op (unused by gloo)."""
    import sys

    build = sys.modules["deepspeed.comm.torch"].build_shm_op
    assert build.__module__ == dsi.__name__ and build() is None
