"""Working with trained models outside the training job: consolidate TP shards, evaluate, ablate.

A *model directory* is this project's deployable format, written by ``sgtm ablate`` and
``sgtm consolidate``::

    model.safetensors              the TP=1 (consolidated) weights
    config.yaml                    the experiment config the model was trained with
    meta.json                      step, source checkpoint, partition, ablated domains
    calibration_bias.safetensors   optional: the calibrated per-vocabulary output bias

Checkpoints are read with ``torch.load(weights_only=True)`` (model states only, through
:func:`pipeline.components.checkpoint.safe_torch_load`: a crafted pickle is refused with one
line naming the file); model directories with safetensors; configs with ``yaml.safe_load``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.components import checkpoint as ckpt
from pipeline.config import EngineConfig, ExperimentConfig, load_config, to_dict


@dataclass
class LoadedModel:
    cfg: ExperimentConfig
    state: dict[str, torch.Tensor]  # TP=1 parameter tensors
    meta: dict
    bias: torch.Tensor | None = None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints dir, a checkpoint tag dir, or a model dir -> the directory to read."""
    p = Path(path)
    if (p / "model.safetensors").is_file() or list(p.glob("mp_rank_*_model_states.pt")):
        return p
    for root in (p / "checkpoints", p):
        tag = ckpt.latest_tag(root)
        if tag is not None:
            return root / tag
    raise FileNotFoundError(f"{p}: not a checkpoint, run directory or model directory")


def consolidate(tag_dir: Path) -> LoadedModel:
    """Merge the TP shards of a DeepSpeed checkpoint into one TP=1 state dict."""
    from pipeline.model.tp_state import merge_tp_shards

    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no mp_rank_*_model_states.pt files")
    shards = [ckpt.safe_torch_load(f, map_location="cpu") for f in files]  # weights_only=True
    first = shards[0]
    for key in ("config", "tp_layout", "partition", "step"):
        if key not in first:
            raise KeyError(f"{files[0]}: missing '{key}'; not written by sgtm train")
    if first.get("module") is None and list(tag_dir.glob("layer_*-model_states.pt")):
        return _consolidate_pipeline(tag_dir, shards)
    layout = first["tp_layout"]
    state = {}
    for name, tensor in first["module"].items():
        if not torch.is_tensor(tensor):  # megatron's `_extra_state` entries
            continue
        if name in layout:  # [dim, stride] or, replicated K/V rows, [dim, stride, replicas, tail]
            state[name] = merge_tp_shards([s["module"][name] for s in shards], *layout[name])
        else:
            state[name] = tensor
    cfg = load_config(data=first["config"])
    meta = {"step": first["step"], "source": str(tag_dir), "partition": first["partition"], "ablated_domains": []}
    return LoadedModel(cfg, {k: v.float().contiguous() for k, v in state.items()}, meta)


def _consolidate_pipeline(tag_dir: Path, shards: list[dict]) -> LoadedModel:
    """A pipeline-parallel checkpoint (DeepSpeed writes one file per layer and TP rank; the
    model-states files, one per stage and TP rank, hold the client state) as one TP=1, PP=1
    state dict under the Transformer's names (:func:`pipeline.model.layout.canonical_name`)."""
    from pipeline.model.layout import canonical_name
    from pipeline.model.tp_state import merge_tp_shards

    first = shards[0]
    cfg = load_config(data=first["config"])
    tp, n = cfg.engine.tensor_parallel, cfg.model.n_layers
    layout: dict = {}
    for shard in shards:  # each stage's file lists its own layers' sharded parameters
        layout.update(shard["tp_layout"])
    state = {}
    for layer in range(n + 2):
        files = [tag_dir / f"layer_{layer:02d}-model_{t:02d}-model_states.pt" for t in range(tp)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: missing; a pipeline checkpoint of {n} blocks at TP={tp} "
                                    f"has layers 0-{n + 1} per TP rank")
        parts = [ckpt.safe_torch_load(f, map_location="cpu") for f in files]
        for name, tensor in parts[0].items():
            if not torch.is_tensor(tensor):
                continue
            pipe_name = f"{layer}.{name}"
            full = merge_tp_shards([p[name] for p in parts], *layout[pipe_name]) if pipe_name in layout else tensor
            state[canonical_name(layer, name, n)] = full
    cfg.engine.pipeline_parallel = 1  # the consolidated model is one PP=1, TP=1 state dict
    meta = {"step": first["step"], "source": str(tag_dir), "partition": first["partition"], "ablated_domains": []}
    return LoadedModel(cfg, {k: v.float().contiguous() for k, v in state.items()}, meta)


def load_model_dir(path: Path) -> LoadedModel:
    from safetensors.torch import load_file

    cfg = load_config(data=yaml.safe_load((path / "config.yaml").read_text()))
    meta = json.loads((path / "meta.json").read_text())
    bias_file = path / "calibration_bias.safetensors"
    bias = load_file(str(bias_file))["bias"] if bias_file.is_file() else None
    return LoadedModel(cfg, load_file(str(path / "model.safetensors")), meta, bias)


def load_any(path: str | Path) -> LoadedModel:
    p = resolve_checkpoint(path)
    return load_model_dir(p) if (p / "model.safetensors").is_file() else consolidate(p)


def single_process_model(loaded: LoadedModel):
    """The TP=1 model in a world of one process, weights loaded, ablation switch applied."""
    from pipeline.backend.distributed import init_distributed
    from pipeline.engine.engine import build_model
    from pipeline.model.tp_state import load_full_state_dict

    cfg = loaded.cfg
    cfg.engine.tensor_parallel = 1
    dist = init_distributed(EngineConfig(tensor_parallel=1, device=cfg.engine.device))
    _, model = build_model(cfg, dist)
    load_full_state_dict(model, loaded.state)
    names = loaded.meta.get("partition", {}).get("domains", [])
    model.set_ablated([names.index(n) for n in loaded.meta.get("ablated_domains", [])])
    return model.to(dist.device).eval(), dist


def write_model_dir(loaded: LoadedModel, out: Path) -> Path:
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in loaded.state.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(loaded.cfg), sort_keys=False))
    (tmp / "meta.json").write_text(json.dumps(loaded.meta, indent=2))
    if loaded.bias is not None:
        save_file({"bias": loaded.bias.contiguous()}, str(tmp / "calibration_bias.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # whole directory appears at once
    return out


def _progress(what: str):
    """Progress lines on stderr (stdout carries the command's JSON/summary), timestamped like the
    training log's, so `sgtm eval` / `sgtm ablate --calibrate` in a batch job show where they are."""
    import sys
    import time

    def report(line: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {line}", file=sys.stderr, flush=True)

    return report


def _eval_batches(cfg: ExperimentConfig):
    from pipeline.train.loop import eval_sets

    if cfg.data is None:
        raise ValueError("data: evaluation needs a data section (give --data FILE)")
    return eval_sets(cfg)


def evaluate_checkpoint(path: str | Path, data: str | None = None, overrides: list[str] | None = None,
                        out: str | None = None) -> dict:
    from pipeline.components.evaluation import evaluate

    loaded = load_any(path)
    raw = to_dict(loaded.cfg)
    if data:
        raw["data"] = yaml.safe_load(Path(data).read_text())
        raw["data"].setdefault("domains", [d["name"] for d in raw["sgtm"]["domains"]])
    loaded.cfg = load_config(data=raw, overrides=overrides)
    model, dist = single_process_model(loaded)
    evals, calib = _eval_batches(loaded.cfg)
    domains = list(range(len(loaded.cfg.sgtm.domains)))
    cal = loaded.cfg.eval.calibration if loaded.cfg.eval.calibrate else None
    results = evaluate(model, evals, calib if cal else None, domains, cal, dist.device, report=_progress("eval"))
    report = {"checkpoint": str(resolve_checkpoint(path)), "step": loaded.meta.get("step"),
              "sets": {name: {"full": r.full, "ablated": r.ablated, "calibrated": r.calibrated, "tokens": r.tokens}
                       for name, r in results.items()}}
    target = Path(out) if out else resolve_checkpoint(path) / "eval.json"
    ckpt.atomic_write_text(target, json.dumps(report, indent=2))
    return report


def ablate_checkpoint(path: str | Path, out: str | Path, domains: list[str] | None = None,
                      calibrate: bool = False) -> Path:
    """Consolidate, zero the forget slices of ``domains`` (default all), optionally fit the
    calibrated output bias, and write a model directory."""
    from pipeline.model.ablate import ablate

    loaded = load_any(path)
    model, dist = single_process_model(loaded)
    names = [d.name for d in loaded.cfg.sgtm.domains]
    chosen = names if not domains else domains
    for name in chosen:
        if name not in names:
            raise ValueError(f"--domains: {name!r} is not a forget domain of this model ({names})")
    idx = [names.index(n) for n in chosen]
    ablate(model, idx)
    from pipeline.model.tp_state import gather_full_state_dict

    loaded.state = gather_full_state_dict(model)
    loaded.meta = {**loaded.meta, "ablated_domains": sorted(set(loaded.meta.get("ablated_domains", [])) | set(chosen))}
    if calibrate:
        from pipeline.components.evaluation import fit_calibration_bias

        _, calib = _eval_batches(loaded.cfg)
        loaded.bias = fit_calibration_bias(model, calib, idx, loaded.cfg.eval.calibration, dist.device,
                                           report=_progress("ablate")).cpu()
    return write_model_dir(loaded, Path(out))


def consolidate_checkpoint(path: str | Path, out: str | Path) -> Path:
    return write_model_dir(load_any(path), Path(out))
