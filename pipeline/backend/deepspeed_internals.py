"""The one place that reads or patches DeepSpeed's internals (private attributes, instance patches).

Everything else in the pipeline uses DeepSpeed's public API (``deepspeed.initialize``,
``engine.backward/step``, ``save_checkpoint``/``load_checkpoint``) or the small functions here.
What is private, and why it is needed:

* per-partition clipping: ZeRO-1/2 keep this rank's gradient partition in the optimizer's
  ``averaged_gradients``, located per parameter by ``bit16_groups``/``params_in_partition`` and
  the ``_hp_mapping`` fragment addresses (:func:`gradient_fragments`); our clip must run between
  the gradient reduction and the update, which only ``scaled_global_norm`` marks
  (:func:`wrap_before_optimizer_clip`);
* a step that must not be applied (non-finite loss or gradients) goes down DeepSpeed's own
  overflow path (``check_grad_overflow``/``has_overflow``, the bf16 optimizer's
  ``clear_hp_grads``) in :func:`skip_step`;
* pipeline parallelism: the pipeline engine runs its optimizer step as an instruction of its
  schedule (``_INSTRUCTION_MAP``), where the non-finite check and ZeRO-0 clipping go
  (:func:`wrap_pipe_optimizer_step`); its summed micro-batch losses (``total_loss``,
  :func:`pipe_losses_finite`); a ``PipelineModule`` keeps every stage's layers in
  ``_layer_specs`` (:func:`release_remote_layers`); exercised by ``tests/test_pipeline_parallel.py``;
* on CPU, DeepSpeed's shared-memory op build (unused by gloo) is skipped (:func:`skip_shm_build`);
* crash-safe checkpoints: the checkpoint engine's ``save``/``makedirs``/``load`` and the
  engine's ``_copy_recovery_script`` (:func:`wrap_checkpoint_writes`, :func:`set_checkpoint_loader`),
  and the classes DeepSpeed pickles into optimizer files (:func:`checkpoint_safe_globals`);
* ``sgtm check-isolation`` compares the fp32 masters and Adam moments, which bf16 at ZeRO-0 keeps
  in the wrapper's ``fp32_groups`` (:func:`optimizer_held_state`).

These names and call orders are DeepSpeed's and change between releases, so :func:`check_version`
refuses any version outside :data:`SUPPORTED` before an engine is built. There is deliberately
no override: a DeepSpeed upgrade means running ``tests/test_deepspeed_internals.py`` (one test
per hook, on the real engine) against it and widening :data:`SUPPORTED` in the same commit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import metadata

import torch

# The versions whose internals this module is written and tested against (constraints.txt pins 0.19.8).
SUPPORTED = ">=0.19.8,<0.19.9"
_WRAPPED = "_sgtm_wrapped_scaled_global_norm"


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is not one whose internals this module knows; one line."""


class ClipHookError(ValueError):
    """A DeepSpeed setup in which the per-partition clipper would not run; one line naming the key."""


# ---------------------------------------------------------------------------------------- version


def installed_version() -> str:
    """The installed DeepSpeed's version, read without importing it (importing takes seconds)."""
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return "none"


def check_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed whose internals were not tested here (one line); returns the version."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = installed_version() if version is None else version
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED)
    except InvalidVersion:
        ok = False
    if not ok:
        raise DeepSpeedVersionError(
            f"deepspeed {version} is installed; pipeline/backend/deepspeed_internals.py supports deepspeed{SUPPORTED} "
            f"(install the pin in constraints.txt, or run tests/test_deepspeed_internals.py against it and "
            f"widen SUPPORTED)")
    return version


# ---------------------------------------------------------------------------------- ZeRO gradients


def holds_gradient_partition(optimizer) -> bool:
    """ZeRO-1/2: gradients live in the optimizer's partition, not in ``param.grad``."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(optimizer, DeepSpeedZeroOptimizer)


def gradient_fragments(optimizer) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
    """``(param, flat gradient fragment, first element of param it holds)`` for every parameter
    (part) in this rank's ZeRO-1/2 partition; the fragments are views, so scaling them in place
    scales what the optimizer applies. Valid between the boundary backward and the update.

    ``averaged_gradients[i]`` is a list of per-parameter fragments, or (bf16 with fp32
    accumulation) one flat buffer laid out like the fp32 partition."""
    out = []
    ag = optimizer.averaged_gradients
    for i in range(len(optimizer.bit16_groups)):
        grads = ag.get(i) if isinstance(ag, dict) else ag[i]
        if grads is None:
            continue
        for j, p in enumerate(optimizer.params_in_partition[i]):
            mapping = p._hp_mapping
            lp = mapping.lp_fragment_address
            if isinstance(grads, torch.Tensor):
                hp = mapping.get_hp_fragment_address()
                frag = grads.narrow(0, hp.start, hp.numel)
            else:
                frag = grads[j].view(-1)
            if frag.numel() != lp.numel:
                raise RuntimeError(f"ZeRO gradient fragment of {tuple(p.shape)}: {frag.numel()} elements, "
                                   f"_hp_mapping says {lp.numel}; DeepSpeed's layout changed")
            out.append((p, frag, int(lp.start)))
    return out


def local_gradients(engine) -> list[torch.Tensor]:
    """This rank's gradients after the boundary backward: the ZeRO-1/2 partition, else ``param.grad``."""
    opt = engine.optimizer
    if holds_gradient_partition(opt):
        ag = opt.averaged_gradients
        groups = ag.values() if isinstance(ag, dict) else ag
        return [t for g in groups if g is not None for t in ((g,) if torch.is_tensor(g) else g) if t is not None]
    return [p.grad for p in engine.module.parameters() if p.grad is not None]


def wrap_before_optimizer_clip(optimizer, fn: Callable[[object], None]) -> None:
    """Run ``fn(optimizer)`` in every ZeRO-1/2 step that applies an update, after the gradients
    are reduced into ``averaged_gradients`` and before DeepSpeed reads them: DeepSpeed 0.19.8
    calls ``scaled_global_norm`` exactly there, once per non-overflow step, when
    ``compute_grad_norm`` is on and the optimizer is not offloaded (see :func:`require_clip_hook`)."""
    if not holds_gradient_partition(optimizer):
        raise TypeError(f"{type(optimizer).__name__}: not a ZeRO-1/2 optimizer; nothing to wrap")
    if getattr(optimizer, _WRAPPED, False):
        raise RuntimeError("scaled_global_norm is already wrapped; one clipper per optimizer")
    original = optimizer.scaled_global_norm

    def scaled_global_norm(*args, **kwargs):
        fn(optimizer)
        return original(*args, **kwargs)

    optimizer.scaled_global_norm = scaled_global_norm
    setattr(optimizer, _WRAPPED, True)


def unwrap_optimizer_clip(optimizer) -> None:
    """Undo :func:`wrap_before_optimizer_clip` (tests; an engine being torn down)."""
    if getattr(optimizer, _WRAPPED, False):
        del optimizer.scaled_global_norm  # back to the class method
        delattr(optimizer, _WRAPPED)


def require_clip_hook(engine, key: str = "engine.clip_mode") -> None:
    """Refuse (one line naming the key) a built engine in which the per-partition clipper would
    silently not run or not see the gradients it must clip. Fine: a ZeRO-1/2 optimizer that calls
    ``scaled_global_norm`` on ``averaged_gradients``, or a plain torch optimizer (fp32 ZeRO-0,
    clipped in ``param.grad``)."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    opt = engine.optimizer
    if holds_gradient_partition(opt):
        if not opt.compute_grad_norm:
            raise ClipHookError(f"zero_optimization.compute_grad_norm: false skips scaled_global_norm, where "
                                f"{key}=per_partition clips; it must stay true")
        if opt.cpu_offload:
            raise ClipHookError(f"zero_optimization.offload_optimizer: the offloaded gradients are not in "
                                f"averaged_gradients, where {key}=per_partition clips; not supported")
        if getattr(opt, "zenflow", False):
            raise ClipHookError(f"zero_optimization.zenflow: its optimizer step bypasses {key}=per_partition "
                                f"clipping; not supported")
    elif isinstance(opt, DeepSpeedOptimizer):  # bf16 wrappers keep their own gradient buffers
        raise ClipHookError(f"{key}: per_partition clipping with bf16 needs zero_stage 1 or 2 "
                            f"(DeepSpeed's {type(opt).__name__} keeps gradients out of reach)")


def check_clip_config(ds_config: dict, key: str = "engine.clip_mode") -> None:
    """The same refusal as :func:`require_clip_hook`, on the DeepSpeed config dict before the
    engine is built (cheaper, and names the dict key)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("compute_grad_norm", True) is False:
        raise ClipHookError(f"zero_optimization.compute_grad_norm: false skips scaled_global_norm, where "
                            f"{key}=per_partition clips; it must stay true")
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None):
        raise ClipHookError(f"zero_optimization.offload_optimizer: the offloaded gradients are not in "
                            f"averaged_gradients, where {key}=per_partition clips; not supported")
    if zero.get("zenflow") not in (None, {}):
        raise ClipHookError(f"zero_optimization.zenflow: its optimizer step bypasses {key}=per_partition "
                            f"clipping; not supported")


# ------------------------------------------------------------------------------ process groups


def skip_shm_build() -> None:
    """CPU: DeepSpeed JIT-compiles a shared-memory op on first init (~40 s) that gloo never uses."""
    import deepspeed.comm.torch  # noqa: F401

    mod = sys.modules["deepspeed.comm.torch"]
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


# ------------------------------------------------------------------------------------ skip a step


def skip_step(engine, step_fn: Callable[[], None] | None = None) -> None:
    """``engine.step()`` at the boundary without applying the update: gradients are dropped, the
    weights and Adam moments stay as they were, the LR schedule advances by one step (so it keeps
    following the loop's step count). Uses DeepSpeed's own overflow path where it has one; the
    caller has made sure every rank skips (the overflow all-reduce is answered locally).
    ``step_fn``: what steps the engine (the pipeline engine's own optimizer-step instruction)."""
    opt = engine.optimizer
    step = engine.step if step_fn is None else step_fn
    if holds_gradient_partition(opt):  # ZeRO-1/2
        check = opt.check_grad_overflow
        opt.check_grad_overflow = True
        opt.has_overflow = lambda *a, **k: True  # all ranks agreed already
        try:
            step()
        finally:
            del opt.has_overflow
            opt.check_grad_overflow = check
    elif hasattr(opt, "_skip_invalid_grad_norm"):  # bf16 ZeRO-0: DeepSpeed's FP16_(Unfused)Optimizer
        opt.step = lambda closure=None: opt._skip_invalid_grad_norm()
        try:
            step()
        finally:
            del opt.step
    elif hasattr(opt, "clear_hp_grads") and hasattr(opt, "clear_lp_grads"):  # BF16_Optimizer (fp32 accumulation)
        def skip(closure=None):  # noqa: ARG001
            opt.overflow = True
            opt.clear_hp_grads()
            opt.clear_lp_grads()
        opt.step = skip
        try:
            step()
        finally:
            del opt.step
    else:  # a plain torch optimizer (ZeRO-0 fp32) skips parameters without gradients
        for p in engine.module.parameters():
            p.grad = None
        step()
    if getattr(opt, "overflow", False) and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()  # DeepSpeed does not advance the schedule on overflow


# ------------------------------------------------------------------------------- pipeline engine


def wrap_pipe_optimizer_step(engine, before: Callable[[object], bool]) -> None:
    """Run ``before(engine)`` in every step of a DeepSpeed ``PipelineEngine``, after its gradient
    reduction and before its optimizer step (the ``OptimizerStep`` instruction of its schedule,
    dispatched through the class's ``_INSTRUCTION_MAP``, which 0.19.8 runs after ``ReduceGrads``);
    ``False`` skips the update (:func:`skip_step`). The pipeline engine's ``step()`` is not
    callable (``train_batch`` runs the whole schedule), so this is where the non-finite check
    and ZeRO-0 clipping go."""
    from deepspeed.runtime.pipe import schedule

    table = type(engine)._INSTRUCTION_MAP
    original = table[schedule.OptimizerStep]

    def optimizer_step(self, lr_kwargs=None):
        if before(self):
            return original(self, lr_kwargs)
        skip_step(self, step_fn=lambda: original(self, lr_kwargs))
        return None

    engine._INSTRUCTION_MAP = {**table, schedule.OptimizerStep: optimizer_step}


def pipe_losses_finite(engine) -> torch.Tensor:
    """On the last pipeline stage: are this step's micro-batch losses finite (the engine sums them
    in ``total_loss`` before the optimizer step)? Other stages: True."""
    total = getattr(engine, "total_loss", None)
    if not engine.is_last_stage() or total is None:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(total.detach()).all().cpu()


def release_remote_layers(module) -> None:
    """Drop a ``PipelineModule``'s references to the layers other stages own (``_layer_specs``
    keeps every layer it was given; only this stage's are used after construction), so their
    parameters are freed."""
    start, stop = module._local_start, module._local_stop
    module._layer_specs = [layer if start <= i < stop else None for i, layer in enumerate(module._layer_specs)]


# ------------------------------------------------------------------------------------ checkpoints


WriteGuard = Callable[[str, Callable, Callable[..., str]], Callable]


def wrap_checkpoint_writes(engine, guard: WriteGuard) -> Callable[[], None]:
    """Route every file write of ``engine.save_checkpoint`` through ``guard(name, fn, target)``,
    which returns the replacement for ``fn``; ``target(*args, **kwargs)`` names the path that call
    writes. ``name`` is ``save`` (a state file), ``makedirs`` or ``copy_recovery_script``.
    Returns the function that puts DeepSpeed's own methods back."""
    ce = engine.checkpoint_engine
    save, makedirs = ce.save, ce.makedirs
    ce.save = guard("save", save, lambda *a, **k: k.get("path", a[1] if len(a) > 1 else "?"))
    ce.makedirs = guard("makedirs", makedirs, lambda *a, **k: k.get("path", a[0] if a else "?"))
    copy_script = getattr(engine, "_copy_recovery_script", None)
    if copy_script is not None:
        engine._copy_recovery_script = guard("copy_recovery_script", copy_script,
                                             lambda *a, **k: k.get("save_path", a[0] if a else "?"))

    def restore() -> None:
        ce.save, ce.makedirs = save, makedirs
        if copy_script is not None:
            del engine._copy_recovery_script  # back to the class method

    return restore


def set_checkpoint_loader(engine, load: Callable[..., object]) -> None:
    """Make every ``torch.load`` of ``engine.load_checkpoint`` (model, ZeRO optimizer states) call
    ``load(path, map_location=None)``: 0.19.8's ``TorchCheckpointEngine.load`` unpickles with
    ``weights_only=False``."""
    engine.checkpoint_engine.load = load


def checkpoint_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed 0.19.8 puts into its checkpoint files (ZeRO-1/2
    optimizer states): a namedtuple, an enum and the (static, for fp32/bf16) loss scaler."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


# ----------------------------------------------------------------------------- elastic resume

# What DeepSpeed 0.19.8 keeps at the top of a model-states file besides the client state
# (``DeepSpeedEngine._common_checkpoint_state`` + ``load_checkpoint``'s own list).
_DS_MODEL_STATE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version"})


def client_state_of(model_states: dict) -> dict:
    """The client state ``save_checkpoint(client_state=...)`` merged into a model-states file."""
    return {k: v for k, v in model_states.items() if k not in _DS_MODEL_STATE_KEYS}


def saved_zero_stage(model_states: dict) -> int:
    """The ZeRO stage a model-states file was written with (its saved DeepSpeed config)."""
    return int((model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))


def engine_counters(model_states: dict) -> dict:
    """The engine's step counters as saved (``global_steps`` etc.)."""
    return {k: model_states.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}


def set_engine_counters(engine, counters: dict) -> None:
    """What ``load_checkpoint`` restores on the engine besides the module and optimizer."""
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])


def zero_optimizer_files(tag_dir, tp_rank: int) -> list:
    """The ZeRO-1/2 optimizer files of one TP rank, in DP-rank order."""
    from pathlib import Path

    files = list(Path(tag_dir).glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"))
    rank = {f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]) for f in files}
    files.sort(key=rank.get)
    if [rank[f] for f in files] != list(range(len(files))):
        raise ValueError(f"{tag_dir}: ZeRO optimizer files of TP rank {tp_rank} are not DP ranks 0..{len(files) - 1}")
    return files


def zero_param_states(optimizer_files: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter name, the DP-consolidated flat fp32 master (``param``) and every optimizer
    state the size of the partition (Adam: ``exp_avg``, ``exp_avg_sq``) plus scalar ones (``step``),
    from one TP rank's ZeRO-1/2 optimizer files (DP-rank order). Each file holds this rank's flat
    partitions (``single_partition_of_fp32_groups`` without padding, the base optimizer's state per
    group) and ``param_slice_mappings``: name -> (numel, start) of the parameter's piece in it; a
    parameter's pieces in rank order are the parameter, flattened."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: dict[str, dict[str, torch.Tensor]] = {}
    for f in optimizer_files:
        sd = f["optimizer_state_dict"]
        fp32 = sd["single_partition_of_fp32_groups"]
        base = sd["base_optimizer_state"]
        if isinstance(base, dict):  # rigid: the torch optimizer's state_dict over the flat partitions
            group_states = [base["state"].get(g["params"][0], {}) for g in base["param_groups"]]
        else:  # elastic: one state per group, the step kept apart
            group_states = [{**g, "step": torch.tensor(float(sd["base_optimizer_state_step"]))} for g in base]
        for i, mapping in enumerate(sd["param_slice_mappings"]):
            for name, frag in mapping.items():
                start, numel = int(frag.start), int(frag.numel)
                entry = pieces.setdefault(name, {})
                entry.setdefault("param", []).append(fp32[i].narrow(0, start, numel))
                for key, value in group_states[i].items():
                    if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= fp32[i].numel():
                        entry.setdefault(key, []).append(value.narrow(0, start, numel))
                    else:  # the step count
                        scalars.setdefault(name, {})[key] = torch.as_tensor(value, dtype=torch.float32).clone()
    return {name: {**{k: torch.cat(v).float() for k, v in entry.items()}, **scalars.get(name, {})}
            for name, entry in pieces.items()}


def plain_optimizer(engine):
    """The torch optimizer when DeepSpeed runs it unwrapped (ZeRO-0 fp32), else None."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) and not holds_gradient_partition(opt) and \
        type(opt).__module__.startswith("torch.") else None


def init_zero_optimizer_state(optimizer, step: torch.Tensor, keys: list[str]) -> None:
    """Give a ZeRO-1/2 optimizer that has not stepped yet its base optimizer state (zeros for
    ``keys``, the given ``step``) for every group, then let DeepSpeed link its parameters'
    optimizer-state fragments (``_lazy_init_hp_params_optimizer_state``, which 0.19.8 runs once
    after the first group's first step, before the other groups have state: their fragments stay
    empty, which is why reads and writes here go by address, :func:`full_param_state`)."""
    if not holds_gradient_partition(optimizer):
        raise TypeError(f"{type(optimizer).__name__}: not a ZeRO-1/2 optimizer")
    for flat in optimizer.single_partition_of_fp32_groups:
        state = optimizer.optimizer.state[flat]
        state["step"] = step.clone()
        for key in keys:
            state[key] = torch.zeros_like(flat)
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def _zero_flat(optimizer, param, key: str) -> torch.Tensor | None:
    """The flat partition tensor holding ``key`` (``param``: the fp32 master) of ``param``'s group."""
    flat = optimizer.single_partition_of_fp32_groups[param._hp_mapping.param_group_index]
    return flat if key == "param" else optimizer.optimizer.state.get(flat, {}).get(key)


def _zero_state_keys(optimizer) -> list[str]:
    """Optimizer states laid out like the flat partitions (Adam: exp_avg, exp_avg_sq)."""
    keys = set()
    for flat in optimizer.single_partition_of_fp32_groups:
        for key, value in optimizer.optimizer.state.get(flat, {}).items():
            if torch.is_tensor(value) and value.shape == flat.shape:
                keys.add(key)
    return sorted(keys)


def full_param_state(engine, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """This TP rank's whole fp32 master of one parameter and its optimizer states (gathered over
    DP under ZeRO-1/2: each rank contributes the piece its ``_hp_mapping`` addresses, one
    all-reduce per tensor, collective over the DP group)."""
    import torch.distributed as dist

    opt = engine.optimizer
    if holds_gradient_partition(opt):
        keys = _zero_state_keys(opt)
        out = {}
        for key in ["param", *keys]:
            buffer = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            mapping = param._hp_mapping
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
                buffer.narrow(0, lp.start, lp.numel).copy_(_zero_flat(opt, param, key).narrow(0, hp.start, hp.numel))
            dist.all_reduce(buffer, group=param._dp_group)
            out[key] = buffer.view(param.shape).cpu()
        if keys:
            out["step"] = optimizer_step(opt).float()
        return out
    plain = plain_optimizer(engine)
    if plain is None:
        raise TypeError(f"{type(opt).__name__}: optimizer state of this DeepSpeed wrapper is not readable here")
    out = {"param": param.detach().float().cpu().clone()}
    for key, value in plain.state.get(param, {}).items():
        out[key] = value.detach().float().cpu().clone()
    return out


def set_full_param_state(engine, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Write this rank's ZeRO-1/2 piece of ``param``'s fp32 master (``key='param'``) or optimizer
    state ``key`` from the whole (TP-local) tensor ``value``; the inverse of :func:`full_param_state`."""
    mapping = param._hp_mapping
    if mapping is None:
        return  # no piece of this parameter in this rank's partition
    lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
    target = _zero_flat(engine.optimizer, param, key)
    target.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel).to(target.dtype))


def optimizer_step(optimizer) -> torch.Tensor:
    """The Adam step count of a ZeRO-1/2 optimizer (one per flat group; they agree)."""
    steps = {float(optimizer.optimizer.state[flat]["step"]) for flat in optimizer.single_partition_of_fp32_groups
             if "step" in optimizer.optimizer.state.get(flat, {})}
    if len(steps) > 1:
        raise RuntimeError(f"ZeRO optimizer groups disagree on the step count: {sorted(steps)}")
    return torch.tensor(steps.pop() if steps else 0.0)


def optimizer_held_state(engine, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """What the optimizer holds for ``param`` on this TP rank: the fp32 master (``param``) and its
    states (Adam: ``exp_avg``, ``exp_avg_sq``), on CPU. Collective over DP under ZeRO-1/2 and the
    bf16 pipeline optimizer. :func:`full_param_state` covers ZeRO-1/2 and plain fp32; bf16 at ZeRO-0
    keeps the master elsewhere: ``FP16_UnfusedOptimizer`` in ``fp32_groups`` (parallel to
    ``fp16_groups``), ``BF16_Optimizer`` (pipeline) behind the ``_hp_mapping`` DeepSpeed's
    ``safe_get_full_*`` reads. ``sgtm check-isolation`` compares these, not the bf16 weights."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if isinstance(opt, FP16_UnfusedOptimizer):
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                if lp is param:
                    state = {k: v for k, v in opt.optimizer.state.get(hp, {}).items() if torch.is_tensor(v)}
                    return {k: v.detach().float().cpu().clone() for k, v in {"param": hp, **state}.items()}
        raise KeyError(f"parameter {tuple(param.shape)} is not in the bf16 optimizer's groups")
    if isinstance(opt, BF16_Optimizer):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"param": safe_get_full_fp32_param(param)}
        for key in ("exp_avg", "exp_avg_sq"):
            out[key] = safe_get_full_optimizer_state(param, key)
        return {k: v.detach().float().cpu().clone() for k, v in out.items() if v is not None}
    return full_param_state(engine, param)
