"""`sgtm sweep`: expand a grid of experiment overrides, run the cells one after another (or emit one
SLURM array job), skip finished cells, and record every cell's metrics.

A sweep file (``configs/sweeps/NAME.yaml``)::

    name: undiscovered
    base: experiments/demo.yaml          # experiment config (beside the sweep file or under configs/)
    data: {prepare: bilingual, vocab_size: 4096}   # or {prepare: wiki}; or omit (base has data)
    overrides: [model.max_seq_len=128, train.steps=300]   # every cell
    grid:                                # the cross product of the axes
      method:                            # a mapping axis: label -> overrides
        sgtm: [sgtm.strategy=sgtm, data.filter=none]
        weak_filter: [sgtm.strategy=none, data.filter=weak]
      data.tagging.undiscovered_rate: [0.0, 0.2]   # a list axis: key -> values
    exclude: [{method: weak_filter, data.tagging.undiscovered_rate: 0.2}]   # optional
    seeds: [0, 1, 2]                     # optional: every cell once per seed (label ``seed``)

A seed sets ``train.seed`` (model init and data order) and ``data.tagging.seed`` (which documents
the simulated label noise leaves undiscovered or puts in retain mode): the analyses report the mean
and a 95% interval over seeds, and verdicts come from the interval of a difference.

A cell's directory is ``<out>/cells/<key>`` where ``key`` hashes the fully resolved config (not the
run dir), so the same cell in two sweeps is trained once. A cell is finished when its
``final.json`` exists; a cell with a checkpoint but no ``final.json`` resumes. Each cell runs
``python -m pipeline train --config <out>/<name>/base.yaml OVERRIDES run_dir=...`` in its own
process (log in ``<cell>/train.log``); ``--slurm`` writes the same command lines as an array job.

Every finished cell also writes its summary to the committed cell store
(``docs/results/cells/<name>/<cell>.json``, :mod:`pipeline.experiments.cells`): a cell whose stored
summary is current is skipped even when its run dir is gone (another machine, an earlier sitting),
a stale one (other ``NUMERICS_VERSION``, evaluation version or config) is re-run, and a run dir
trained under other numerics is set aside (``<cell>/superseded/``) instead of being resumed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (
    CONFIG_ROOT,
    ConfigError,
    compose,
    find_fragment,
    load_config,
    merge,
    read_yaml,
    to_dict,
)
from pipeline.experiments import cells as store_mod

SWEEP_ROOT = CONFIG_ROOT / "sweeps"


@dataclass
class Cell:
    labels: dict[str, Any]  # axis -> label/value (what plots and tables group by)
    overrides: list[str]  # key=value, no whitespace (one shell word each)
    key: str = ""
    run_dir: str = ""
    config: dict = field(default_factory=dict)
    config_hash: str = ""  # machine-independent (the store's staleness key), see pipeline.experiments.cells
    raw: dict = field(default_factory=dict)  # the composed experiment as written (what the hashes read)

    def done(self) -> bool:
        return (Path(self.run_dir) / "final.json").is_file()


def _word(value: Any) -> str:
    """A YAML value as one shell word that YAML parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        if same and not any(c.isspace() for c in value) and "'" not in value and '"' not in value:
            return value
    return json.dumps(value, separators=(",", ":"))


def normalize_override(override: str) -> str:
    if "=" not in override:
        raise ConfigError(f"{override}: override must look like key.path=value")
    k, raw = override.split("=", 1)
    return f"{k}={_word(yaml.safe_load(raw))}"


def find_sweep(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (SWEEP_ROOT / name_or_path, SWEEP_ROOT / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"--config: sweep {name_or_path!r} not found (give a file or a name in {SWEEP_ROOT})")


def load_sweep(path: str | Path) -> dict:
    path = find_sweep(str(path))
    spec = read_yaml(path, str(path)) or {}
    for key in ("name", "base", "grid"):
        if key not in spec:
            raise ConfigError(f"{path}: sweep needs '{key}'")
    unknown = set(spec) - {"name", "base", "data", "overrides", "grid", "exclude", "description", "analyses",
                           "seeds"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{path}: seeds: expected a list of distinct non-negative integers, got {seeds!r}")
    spec["_path"] = str(path)
    return spec


def expand(spec: dict) -> list[Cell]:
    """The cross product of the grid's axes, minus the excluded combinations."""
    axes = []
    for axis, values in spec["grid"].items():
        if isinstance(values, dict):
            axes.append([(axis, label, [normalize_override(o) for o in ovs]) for label, ovs in values.items()])
        elif isinstance(values, list):
            axes.append([(axis, v, [f"{axis}={_word(v)}"]) for v in values])
        else:
            raise ConfigError(f"grid.{axis}: expected a list of values or a mapping label -> overrides")
    if spec.get("seeds") is not None:
        if "seed" in spec["grid"]:
            raise ConfigError("grid.seed: use the sweep's top-level 'seeds:' list instead")
        axes.append([("seed", s, [f"train.seed={s}", f"data.tagging.seed={s}"]) for s in spec["seeds"]])
    common = [normalize_override(o) for o in spec.get("overrides", [])]
    excludes = spec.get("exclude", []) or []
    cells = []
    for combo in itertools.product(*axes):
        labels = {axis: label for axis, label, _ in combo}
        if any(all(labels.get(k) == v for k, v in ex.items()) for ex in excludes):
            continue
        cells.append(Cell(labels, common + [o for _, _, ovs in combo for o in ovs]))
    return cells


def prepare_data(spec: dict, out: Path) -> dict | None:
    """Prepare the sweep's data set once (idempotent) and return its `data:` section."""
    data = spec.get("data")
    if not data:
        return None
    kind = data.get("prepare")
    if kind == "bilingual":
        from pipeline.data.prepare import prepare_bilingual

        v = int(data.get("vocab_size", 4096))
        return prepare_bilingual(out / "data" / f"bilingual_v{v}", vocab_size=v)
    if kind == "wiki":
        from pipeline.data.prepare import prepare_wiki

        tok, where = data.get("tokenizer", "gpt2"), out / "data" / "wiki"
        if data.get("vocab_size"):  # a small BPE trained on the Wikipedia leads (CPU-sized LM head)
            v = int(data["vocab_size"])
            where = out / "data" / f"wiki_v{v}"
            tok = str(wiki_tokenizer(where, v).spec)
        return prepare_wiki(where, tokenizer=tok, retain_fraction=float(data.get("retain_fraction", 0.1)))
    raise ConfigError(f"data.prepare: expected 'bilingual' or 'wiki', got {kind!r}")


def wiki_tokenizer(out_dir: Path, vocab_size: int):
    from pipeline.data.io import BUNDLED_DATA  # noqa: F401  (bundled corpus location)
    from pipeline.data.prepare import WIKI
    from pipeline.data.readers import iter_documents
    from pipeline.data.tokenizer import load_tokenizer, train_bpe

    path = out_dir / f"bpe{vocab_size}.json"
    if path.exists():
        return load_tokenizer(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return train_bpe((d.text for d in iter_documents([str(WIKI)])), vocab_size, path)


def write_base(spec: dict, out: Path) -> Path:
    """The sweep's base experiment with fragments resolved and the prepared data section in it."""
    sweep_dir = Path(spec["_path"]).resolve().parent
    base_path = find_fragment(spec["base"], sweep_dir, "base")
    raw = compose(base_path)
    prepared = prepare_data(spec, out)
    if prepared is not None:  # the base's data settings over the prepared set, whose tag source wins
        mine = raw.get("data") or {}
        rest = {k: v for k, v in mine.items() if k not in ("sources", "tokenizer", "domains")}
        raw["data"] = merge(prepared, rest, {"tagging": {"source": prepared["tagging"]["source"]}}, key="data")
    raw["name"] = spec["name"]
    target = out / spec["name"] / "base.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(raw, sort_keys=False)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return target


def cell_key(base: Path, overrides: list[str]) -> str:
    """Hash of what the user wrote (the base experiment with these overrides applied, without name
    and run_dir), not of the typed config: new config fields with defaults keep old keys valid."""
    return _key_of(compose(base, overrides))


def _key_of(raw: dict) -> str:
    raw = {k: v for k, v in raw.items() if k not in ("name", "run_dir")}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve(cells: list[Cell], base: Path, out: Path) -> list[Cell]:
    """Validate every cell's config up front and give it its content-addressed run dir."""
    names: dict[str, dict] = {}
    for cell in cells:
        cfg = load_config(base, cell.overrides)
        d = to_dict(cfg)
        d.pop("run_dir", None)
        d.pop("name", None)
        cell.raw = compose(base, cell.overrides)
        cell.key = _key_of(cell.raw)
        cell.config_hash = store_mod.config_hash(cell.raw)
        cell.run_dir = str((out / "cells" / cell.key).resolve())
        cell.config = d
        name = store_mod.cell_name(cell.labels)
        if name in names:
            raise ConfigError(f"cells {names[name]} and {cell.labels} share the store name {name!r}: rename a label")
        names[name] = cell.labels
    return cells


def cell_command(base: Path, cell: Cell, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(base), *cell.overrides,
           f"run_dir={cell.run_dir}"]
    return cmd + (["--resume"] if resume else [])


def _has_checkpoint(run_dir: Path) -> bool:
    from pipeline.components.checkpoint import latest_tag

    return (run_dir / "checkpoints").is_dir() and latest_tag(run_dir / "checkpoints") is not None


def run_cell(base: Path, cell: Cell, log=print) -> bool | None:
    """Train one cell in its own process: True when it finished, False when it failed, None when
    another sweep process (a second shell on the same sweep) is training it right now."""
    import fcntl

    run_dir = Path(cell.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Held for the cell's lifetime and dropped by the kernel if this process dies: no stale locks.
    lock = open(run_dir / ".sweep.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        log(f"[sweep] skip {cell.key} {cell.labels}: another sweep process is training it")
        return None
    try:
        set_aside_if_stale(run_dir, log)
        if cell.done():  # finished by that other process while we waited for our turn
            return True
        return _run_locked(base, cell, run_dir, log)
    finally:
        lock.close()


_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE",
              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def write_cell_json(run_dir: Path, cell: Cell, command: str) -> None:
    """``<cell>/cell.json``: what the cell is and which code trains it (``numerics_version`` decides
    whether a finished or half-trained run dir is still valid; ``code`` is provenance)."""
    from pipeline.components.checkpoint import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "cell.json", json.dumps(
        {"labels": cell.labels, "overrides": cell.overrides, "key": cell.key, "config_hash": cell.config_hash,
         "command": command, "numerics_version": store_mod.NUMERICS_VERSION, "code": store_mod.code_identity()},
        indent=2))


def run_state(run_dir: Path) -> tuple[bool, int | None, bool]:
    """(finished, the NUMERICS_VERSION it was trained at or None if unrecorded, started at all)."""
    info = store_mod.read_json(run_dir / "cell.json") or {}
    done = (run_dir / "final.json").is_file()
    started = done or _has_checkpoint(run_dir) or (run_dir / "metrics.jsonl").is_file()
    return done, info.get("numerics_version"), started


def set_aside_if_stale(run_dir: Path, log=print) -> bool:
    """Move a run trained under other numerics (finished or not) into ``<cell>/superseded/`` so the
    cell trains afresh instead of resuming or reusing it; the lock file stays."""
    done, numerics, started = run_state(run_dir)
    if not started or numerics == store_mod.NUMERICS_VERSION:
        return False
    dest = run_dir / "superseded" / f"numerics{numerics}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in run_dir.iterdir():
        if p.name not in (".sweep.lock", "superseded"):
            os.replace(p, dest / p.name)
    log(f"[sweep] set aside {run_dir.name}: trained at NUMERICS_VERSION {numerics}, now "
        f"{store_mod.NUMERICS_VERSION} (-> {dest})")
    return True


def _run_locked(base: Path, cell: Cell, run_dir: Path, log) -> bool:
    resume = _has_checkpoint(run_dir)
    cmd = cell_command(base, cell, resume)
    write_cell_json(run_dir, cell, " ".join(shlex.quote(c) for c in cmd))
    # A cell is a one-process job with its own world: a rank/port inherited from the caller (a
    # torchrun or SLURM step, or a process that already hosts a gloo store) would join or collide.
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.setdefault("DS_ACCELERATOR", "cpu")
    # One thread per cell unless told otherwise: on a shared CPU, spinning OpenMP threads waste
    # more than they gain (SGTM_CELL_THREADS=N to change).
    env["OMP_NUM_THREADS"] = os.environ.get("SGTM_CELL_THREADS", env.get("OMP_NUM_THREADS", "1"))
    from pipeline.backend.distributed import free_port

    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    log(f"[sweep] cell {cell.key} {cell.labels}: rc={rc} in {time.perf_counter() - t0:.0f}s")
    if rc == 0 and cell.done():  # the whole-split deployed evaluation every analysis reads
        from pipeline.experiments.deployed import ensure

        try:
            ensure(run_dir, json.loads((run_dir / "final.json").read_text()).get("step"), log=log)
        except RuntimeError as e:  # the analyses retry it; the trained cell stays finished
            log(f"[sweep] {e}")
    return rc == 0 and cell.done()


def eval_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval":
            by_step[r["step"]] = r  # a resumed run re-logs; keep the last
    return [by_step[s] for s in sorted(by_step)]


def cell_facts(cell: Cell) -> dict:
    """The size/compute/method facts the analyses group and fit by (results.json and the store)."""
    from pipeline.config import ModelConfig
    from pipeline.model.shapes import num_params

    m = cell.config["model"]
    n_params = num_params(ModelConfig(**{k: v for k, v in m.items()}))
    e, t = cell.config["engine"], cell.config["train"]
    tokens_per_step = e["micro_batch_size"] * e["grad_accum_steps"] * m["max_seq_len"]
    return {"strategy": cell.config["sgtm"]["strategy"], "filter": cell.config["data"]["filter"],
            "undiscovered_rate": cell.config["data"]["tagging"]["undiscovered_rate"],
            "d_model": m["d_model"], "n_layers": m["n_layers"], "n_params": n_params,
            "steps": t["steps"], "seed": t["seed"], "tokens_per_step": tokens_per_step,
            "vocab_size": m["vocab_size"], "seq_len": m["max_seq_len"], "lr": cell.config["optimizer"]["lr"],
            "retain_fraction": cell.config["data"]["tagging"]["retain_fraction"],
            "tokens": tokens_per_step * t["steps"]}


def collect(spec: dict, cells: list[Cell], base: Path, out: Path) -> dict:
    """results.json: every cell's labels, overrides, config summary, final and per-eval metrics."""
    rows = []
    for cell in cells:
        run_dir = Path(cell.run_dir)
        final = json.loads((run_dir / "final.json").read_text()) if cell.done() else None
        rows.append({
            "key": cell.key, "config_hash": cell.config_hash, "labels": cell.labels, "overrides": cell.overrides,
            "run_dir": cell.run_dir, "done": final is not None, "final": final, "history": eval_history(run_dir),
            **cell_facts(cell),
            "command": " ".join(shlex.quote(c) for c in cell_command(base, cell)),
        })
    result = {"sweep": spec["name"], "sweep_file": spec["_path"], "base": str(base), "cells": rows,
              "command": f"sgtm sweep --config {spec['_path']} --out {out}"}
    path = out / spec["name"] / "results.json"
    path.write_text(json.dumps(result, indent=2))
    return result


SBATCH = """#!/bin/bash
# One SLURM array task per sweep cell: task i trains line i of {cells}.
# Submit: sbatch --array=1-{n} {script}
#SBATCH --job-name=sgtm-{name}
#SBATCH --output={logs}/%A_%a.out
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail
cd {root}
LINE=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {cells})
eval "set -- $LINE"   # the line is shell-quoted words (key=value overrides, run_dir last)
RUN_DIR=""
for word in "$@"; do case "$word" in run_dir=*) RUN_DIR=${{word#run_dir=}};; esac; done
RESUME=()
if [ -e "$RUN_DIR/checkpoints/latest" ]; then RESUME=(--resume); fi
if [ -e "$RUN_DIR/final.json" ]; then echo "finished: $RUN_DIR"; exit 0; fi
exec {python} -m pipeline train --config {base} "$@" "${{RESUME[@]}}"
"""


def emit_slurm(spec: dict, cells: list[Cell], base: Path, out: Path,
               pending: list[Cell] | None = None) -> tuple[Path, Path, int]:
    """cells.txt (one line of shell-quoted key=value overrides per pending cell, run_dir included)
    and an sbatch array script that trains line $SLURM_ARRAY_TASK_ID of it. Each pending cell's run
    dir gets its ``cell.json`` now (the numerics its array task trains under) and a run of other
    numerics is set aside, so `sgtm sweep --store-only` can store the cells when the array is done."""
    d = out / spec["name"]
    pending = [c for c in cells if not c.done()] if pending is None else pending
    # shell words, quoted where needed: launch/slurm/sweep.sbatch splits lines with shlex
    lines = [" ".join(shlex.quote(o) for o in c.overrides + [f"run_dir={c.run_dir}"]) for c in pending]
    for c, line in zip(pending, lines):
        set_aside_if_stale(Path(c.run_dir), log=lambda m: None)
        write_cell_json(Path(c.run_dir), c, f"sbatch array line: {line}")
    cells_path = d / "cells.txt"
    cells_path.write_text("".join(f"{line}\n" for line in lines))
    script = d / "sweep.sbatch"
    (d / "slurm_logs").mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    script.write_text(SBATCH.format(cells=cells_path.resolve(), n=max(1, len(lines)), script=script.resolve(),
                                    name=spec["name"], logs=(d / "slurm_logs").resolve(), root=root,
                                    python=sys.executable, base=base.resolve()))
    script.chmod(0o755)
    return cells_path, script, len(lines)


# ------------------------------------------------------------------------------ the cell store


def store_cell(spec: dict, cell: Cell, store: Path, log=print) -> Path | None:
    """Write a finished cell's summary to ``store`` (the sweep's store directory) from its run dir:
    final and thinned eval history, the whole-split deployed evaluation (computed if missing), the
    replayed token counts and the parameter counts. None (logged) when the run cannot give them."""
    from pipeline.experiments.counts import count_tokens, param_counts
    from pipeline.experiments.deployed import ensure

    run_dir = Path(cell.run_dir)
    try:
        final = json.loads((run_dir / "final.json").read_text())
        dep = ensure(run_dir, final.get("step"), log=log)
        tokens = count_tokens(run_dir)
        facts = cell_facts(cell)
        params = param_counts({"run_dir": str(run_dir), "n_params": facts["n_params"]})
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        log(f"[sweep] cannot store {cell.key} {cell.labels}: {e}")
        return None
    info = store_mod.read_json(run_dir / "cell.json") or {}
    summary = store_mod.build_summary(
        sweep=spec["name"], labels=cell.labels, overrides=cell.overrides, raw_config=cell.raw, facts=facts,
        final=final, history=eval_history(run_dir), deployed_eval=dep, token_counts=tokens, param_counts=params,
        numerics_version=info.get("numerics_version"), code=info.get("code"), run_key=cell.key)
    path = store_mod.atomic_write_json(store_mod.summary_path(store, cell.labels), summary)
    log(f"[sweep] stored {cell.key} {cell.labels} -> {path}")
    return path


def _copy_summary(spec: dict, cell: Cell, src: Path, store: Path, log=print) -> Path:
    """The same cell (same config hash) stored by another sweep, under this sweep's name and labels."""
    s = json.loads(src.read_text())
    s.update(sweep=spec["name"], cell=store_mod.cell_name(cell.labels), labels=cell.labels,
             overrides=cell.overrides, copied_from=f"{src.parent.name}/{src.stem}")
    path = store_mod.atomic_write_json(store_mod.summary_path(store, cell.labels), s)
    log(f"[sweep] skip finished {cell.key} {cell.labels}: copied the identical cell {src.parent.name}/{src.stem}")
    return path


@dataclass
class Step:
    """What ``sgtm sweep`` does with one cell (see :func:`pipeline.experiments.cells.decide`)."""
    cell: Cell
    action: str  # skip | copy | store | train | retrain
    why: str
    source: Path | None = None  # copy: the identical cell's summary in another sweep


def plan(cells: list[Cell], store: Path | None, root: Path | None = None) -> list[Step]:
    """:func:`pipeline.experiments.cells.decide` on every cell's stored summary and run dir, plus
    ``copy`` when another sweep under ``root`` stored the identical cell. Without a store a finished
    run of today's numerics is ``skip``."""
    index: dict[str, Path] | None = None
    out = []
    for cell in cells:
        summary = store_mod.read_json(store_mod.summary_path(store, cell.labels)) if store else None
        done, numerics, started = run_state(Path(cell.run_dir))
        action, why = store_mod.decide(summary, cell.config_hash, done, numerics, started)
        src = None
        if store is None and action == "store":
            action, why = "skip", "finished"
        if store is not None and action in ("train", "retrain"):
            if index is None:
                index = store_mod.current_index(root if root is not None else Path(store).parent)
            src = index.get(cell.config_hash)
            if src is not None and src.parent.resolve() != Path(store).resolve():
                action, why = "copy", f"{why}; {src.parent.name}/{src.stem} is the identical cell"
            else:
                src = None
        out.append(Step(cell, action, why, src))
    return out


def run_sweep(config: str | Path, out: str | Path = "runs/sweeps", slurm: bool = False, dry_run: bool = False,
              only: list[str] | None = None, log=print, store: str | Path | None = store_mod.STORE_ROOT,
              store_only: bool = False) -> dict:
    """Run (or emit, or store) the sweep's cells. ``store``: the cell store root (the sweep's
    summaries go to ``store/<name>/``; None: no store). ``store_only``: train nothing, (re)write
    the summaries of cells whose run dirs finished under today's numerics."""
    spec = load_sweep(config)
    out = Path(out)
    base = write_base(spec, out)
    every = resolve(expand(spec), base, out)
    cells = every
    if only:
        cells = [c for c in every if any(_selects(c.labels, sel) for sel in only)]
    sdir = Path(store) / spec["name"] if store is not None else None
    if sdir is not None and not dry_run:
        store_mod.write_grid(sdir, spec["name"], spec["_path"], [(c.labels, c.config_hash) for c in every])
    steps = plan(cells, sdir, Path(store) if store is not None else None)
    todo = sum(st.action in ("train", "retrain") for st in steps)
    log(f"[sweep] {spec['name']}: {len(cells)} cells, {len(cells) - todo} finished or stored, {todo} to train; "
        f"base {base}" + (f"; store {sdir}" if sdir is not None else ""))
    if slurm:
        for st in steps:
            if st.action == "copy" and sdir is not None and st.source is not None:
                _copy_summary(spec, st.cell, st.source, sdir, log)
        pending = [st.cell for st in steps if st.action in ("train", "retrain")]
        cells_path, script, n = emit_slurm(spec, cells, base, out, pending)
        log(f"[sweep] wrote {cells_path} ({n} pending cells) and {script}; submit either\n"
            f"  sbatch --array=1-{n} {script}\n"
            f"  sbatch --array=0-{n - 1} --export=ALL,CELLS={cells_path} launch/slurm/sweep.sbatch {base}"
            "   (the launchers' script: same cells file, preemption + requeue)\n"
            f"  then: sgtm sweep --config {spec['_path']} --store-only   (writes the finished cells' summaries)")
        return collect(spec, every, base, out)
    failed: list[str] = []
    untrained: list[str] = []
    for st in steps:
        cell, sel = st.cell, store_mod.selector(st.cell.labels)
        if st.action == "skip":
            log(f"[sweep] skip finished {cell.key} {cell.labels} ({st.why})")
        elif dry_run:
            what = " ".join(shlex.quote(c) for c in cell_command(base, cell))
            log(f"[sweep] would {st.action} {sel} ({st.why})" + (f": {what}" if st.action.endswith("train") else ""))
        elif st.action == "copy" and sdir is not None and st.source is not None:
            _copy_summary(spec, cell, st.source, sdir, log)
        elif st.action == "store" and sdir is not None:
            if store_cell(spec, cell, sdir, log) is None:
                failed.append(cell.key)
            else:
                log(f"[sweep] skip finished {cell.key} {cell.labels} (its run dir finished: summary written)")
        elif store_only:
            log(f"[sweep] not stored {sel}: needs training ({st.why})")
            untrained.append(sel)
        else:
            ok = run_cell(base, cell, log)
            if ok is False or (ok and sdir is not None and store_cell(spec, cell, sdir, log) is None):
                failed.append(cell.key)
            collect(spec, every, base, out)  # results.json grows as cells finish
    return {**collect(spec, every, base, out), "failed": failed, "untrained": untrained,
            "store": str(sdir) if sdir is not None else None}


def pending_selectors(config: str | Path, out: str | Path = "runs/sweeps", only: list[str] | None = None,
                      store: str | Path | None = store_mod.STORE_ROOT) -> list[str]:
    """``k=v,...`` of every cell that still needs training (not skipped, copied or storable): what
    tools/sweep_in_background.sh runs one at a time."""
    spec = load_sweep(config)
    out = Path(out)
    every = resolve(expand(spec), write_base(spec, out), out)
    cells = [c for c in every if not only or any(_selects(c.labels, sel) for sel in only)]
    sdir = Path(store) / spec["name"] if store is not None else None
    return [store_mod.selector(st.cell.labels) for st in plan(cells, sdir, Path(store) if store else None)
            if st.action in ("train", "retrain")]


def find_cell(config: str | Path, selector: str, out: str | Path = "runs/sweeps") -> Path:
    """The run directory of the one cell whose labels match ``selector`` (``k=v,k2=v2``), so
    scripts name cells by what they are instead of by hash."""
    spec = load_sweep(config)
    cells = resolve(expand(spec), write_base(spec, Path(out)), Path(out))
    hits = [c for c in cells if _selects(c.labels, selector)]
    if len(hits) != 1:
        raise ValueError(f"--cell {selector}: expected one matching cell of {spec['name']}, found {len(hits)} "
                         f"(cells: {[c.labels for c in cells]})")
    return Path(hits[0].run_dir)


def _selects(labels: dict, selector: str) -> bool:
    """``k=v,k2=v2``: every pair matches the cell's labels."""
    return all(_match(labels, kv) for kv in selector.split(","))


def _match(labels: dict, kv: str) -> bool:
    k, _, v = kv.partition("=")
    return k in labels and str(labels[k]) == v
