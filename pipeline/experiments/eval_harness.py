"""`sgtm eval-harness`: lm-evaluation-harness accuracies of the deployed model on tasks made from
the run's held-out data (:mod:`pipeline.experiments.harness_tasks`), offline.

Why: loss alone does not say whether a model can still *use* a domain. Multiple-choice accuracy
(chance 1/4) on held-out text of each domain does, in the harness's standard scoring, and the
same HF export can be scored by any other harness task too.

What is scored: the **deployed** model, by the procedure of ``deployed.json``: ablated (forget
parameters zeroed) for SGTM / Gradient Routing / activation masking, the full model for filters
and plain training; no calibration bias is fitted here (a model directory that already holds one,
``sgtm ablate --calibrate``, is exported with it: :func:`pipeline.train.export_hf.export_hf`
folds it in exactly). ``--hf DIR`` scores an existing HF export as it is.

The harness runs in this process through its Python API (``simple_evaluate`` with a
``TaskManager(include_path=TASK_DIR, include_defaults=False)``); the CLI equivalent is recorded in
the output (``cli_equivalent``). ``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1`` are set: the task files
are local JSONL and the model a local directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import tempfile
from pathlib import Path

from pipeline.experiments import harness_tasks as ht

VERSION = 1
RESULT_NAME = "harness.json"  # the per-run cache written into a sweep cell's run dir


def offline_env() -> None:
    """No hub access: the harness reads local task files and a local model directory."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    import sys

    if "datasets" in sys.modules:  # datasets reads the variable at import; a test process may have imported it
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = True


def data_fingerprint(data_cfg, kinds: list[str], seed: int, max_items: int) -> str:
    """What the task files depend on: the shards (manifest hashes), tags, truth, split and generator settings."""
    from pipeline.data.shards import load_manifest

    sources = []
    for s in data_cfg.sources:
        shards = [e["sha256"] for e in load_manifest(s.path)["shards"]]
        sources.append([str(s.path), shards, str(s.tags), s.true_label])
    key = {"format": ht.FORMAT, "sources": sources, "heldout_fraction": data_cfg.heldout_fraction,
           "tokenizer": str(data_cfg.tokenizer), "kinds": list(kinds), "seed": seed, "max_items": max_items}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ensure_tasks(data_cfg, task_dir: str | Path, kinds: list[str], seed: int, max_items: int,
                 log=print) -> dict:
    """The task files for this data config in ``task_dir``: reused when ``tasks.json`` carries the
    same fingerprint, else generated from the held-out split."""
    task_dir = Path(task_dir)
    fp = data_fingerprint(data_cfg, kinds, seed, max_items)
    rec_file = task_dir / "tasks.json"
    if rec_file.is_file():
        rec = json.loads(rec_file.read_text())
        if rec.get("fingerprint") == fp and all((task_dir / f"{n}.yaml").is_file() for n in rec["tasks"]):
            return rec
    log(f"[eval-harness] generating tasks {'/'.join(kinds)} (seed {seed}, at most {max_items} items) from the "
        f"held-out split into {task_dir}")
    rec = ht.write_tasks(ht.read_documents(data_cfg, "heldout"), task_dir, kinds, seed, max_items)
    rec["fingerprint"] = fp
    rec_file.write_text(json.dumps(rec, indent=2))
    return rec


def _one_process_world() -> None:
    """Ablation builds the model (megatron layers): a world of one process, as `sgtm ablate` has."""
    from pipeline.backend.distributed import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def export_deployed(checkpoint: str | Path, work: Path) -> tuple[Path, dict]:
    """HF export of the deployed model of a run / checkpoint / model dir, and what was exported."""
    from pipeline.sgtm.methods import ablates
    from pipeline.train.export_hf import export_hf
    from pipeline.train.offline import ablate_checkpoint, load_any, resolve_checkpoint

    loaded = load_any(checkpoint)
    strategy = loaded.cfg.sgtm.strategy
    already = bool(loaded.meta.get("ablated_domains"))
    src: str | Path = checkpoint
    if ablates(strategy) and not already:
        _one_process_world()
        src = ablate_checkpoint(checkpoint, work / "deployed_model")
    hf = export_hf(src, work / "hf")
    meta = json.loads((hf / "sgtm_meta.json").read_text())
    return hf, {"checkpoint": str(resolve_checkpoint(checkpoint)), "step": loaded.meta.get("step"),
                "strategy": strategy, "filter": loaded.cfg.data.filter if loaded.cfg.data else None,
                "deployed_model": "ablated" if (ablates(strategy) or already) else "full",
                "calibration_bias": meta.get("calibration_bias")}


def cli_equivalent(hf: str, task_dir: str, names: list[str], batch_size: int) -> str:
    return ("HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args "
            f"pretrained={shlex.quote(str(hf))},dtype=float32 --device cpu --include_path {shlex.quote(str(task_dir))} "
            f"--tasks {','.join(names)} --batch_size {batch_size}")


def run_harness(hf: str | Path, task_dir: str | Path, names: list[str], batch_size: int = 32,
                seed: int = 0) -> dict[str, dict]:
    """``simple_evaluate`` on the local tasks; per task the accuracy metrics and the harness's stderr."""
    offline_env()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        raise ht.TaskError(f"{task_dir}: no task {missing[0]!r} (has {', '.join(sorted(tm.all_tasks)) or 'none'})")
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf), "dtype": "float32"}, tasks=names,
                                  device="cpu", batch_size=batch_size, task_manager=tm, log_samples=False,
                                  bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    out = {}
    for name in names:
        r = res["results"][name]
        row = {}
        for metric in ("acc", "acc_norm"):
            row[metric] = float(r[f"{metric},none"])
            se = r.get(f"{metric}_stderr,none")
            row[f"{metric}_stderr"] = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None
        out[name] = row
    return out


def evaluate(checkpoint: str | Path | None = None, hf: str | Path | None = None, config: str | Path | None = None,
             kinds: list[str] | None = None, seed: int = 0, max_items: int = 500, task_dir: str | Path | None = None,
             batch_size: int = 32, out: str | Path | None = None, command: str = "", log=print) -> dict:
    """Export (unless ``hf``), make or reuse the tasks, run the harness, write ``out`` atomically."""
    from pipeline.components.checkpoint import atomic_write_text
    from pipeline.config import load_config

    if (checkpoint is None) == (hf is None):
        raise ht.TaskError("eval-harness: give exactly one of --checkpoint RUN_DIR and --hf DIR")
    kinds = ht.parse_kinds(kinds)
    with tempfile.TemporaryDirectory(prefix="sgtm-harness-") as tmp:
        work = Path(tmp)
        if checkpoint is not None:
            from pipeline.train.offline import load_any

            data_cfg = load_config(config).data if config else load_any(checkpoint).cfg.data
            hf_dir, model = export_deployed(checkpoint, work)
        else:
            hf_dir = Path(hf)
            if not (hf_dir / "config.json").is_file():
                raise FileNotFoundError(f"{hf_dir}: not a HF model directory (no config.json; "
                                        "`sgtm export-hf` writes one)")
            meta_file = hf_dir / "sgtm_meta.json"
            model = {"hf": str(hf_dir), **(json.loads(meta_file.read_text()) if meta_file.is_file() else {})}
            data_cfg = load_config(config).data if config else None
        tdir = Path(task_dir) if task_dir else work / "tasks"
        if data_cfg is None:
            rec_file = tdir / "tasks.json"
            if not rec_file.is_file():
                raise ht.TaskError("--hf: give --config EXPERIMENT.yaml (its data section makes the tasks) or a "
                                   "--task-dir that already holds tasks.json")
            tasks = json.loads(rec_file.read_text())
        else:
            tasks = ensure_tasks(data_cfg, tdir, kinds, seed, max_items, log=log)
        names = [n for n, t in tasks["tasks"].items() if t["kind"] in kinds]
        log(f"[eval-harness] {len(names)} tasks on {hf_dir}")
        scores = run_harness(hf_dir, tdir, names, batch_size=batch_size, seed=seed)
    import lm_eval

    result = {"version": VERSION, "model": model, "fingerprint": tasks.get("fingerprint"),
              "task_settings": {k: tasks.get(k) for k in ("seed", "max_items", "kinds")},
              "tasks": {n: {**tasks["tasks"][n], **scores[n]} for n in names},
              "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.13",
              "command": command,
              "cli_equivalent": cli_equivalent("HF_DIR" if checkpoint is not None else str(hf), str(tdir), names,
                                               batch_size)}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2))
    return result


def cell_result(cell: dict, task_dir: Path, kinds: list[str], seed: int, max_items: int, batch_size: int,
                command: str, log=print) -> dict:
    """A finished cell's harness result, cached in ``<run_dir>/harness.json`` (recomputed when the
    tasks, the settings or the checkpoint step changed)."""
    if not cell.get("run_dir"):  # a cell from the committed store has numbers, not a checkpoint
        raise FileNotFoundError(f"cell {cell['labels']}: the harness needs its checkpoint; give the sweep's run "
                                "output (runs/sweeps/NAME), not the cell store")
    run_dir = Path(cell["run_dir"])
    cached = run_dir / RESULT_NAME
    from pipeline.train.offline import load_any

    data_cfg = load_any(run_dir).cfg.data
    fp = data_fingerprint(data_cfg, kinds, seed, max_items)
    if cached.is_file():
        rec = json.loads(cached.read_text())
        if (rec.get("version") == VERSION and rec.get("fingerprint") == fp
                and rec["model"].get("step") == (cell.get("final") or {}).get("step")):
            return rec
    log(f"[harness] {run_dir.name} ({cell['labels']})")
    return evaluate(checkpoint=run_dir, kinds=kinds, seed=seed, max_items=max_items, task_dir=task_dir / fp,
                    batch_size=batch_size, out=cached, command=command, log=log)
