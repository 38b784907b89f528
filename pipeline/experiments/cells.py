"""The committed cell store: one small JSON summary per finished sweep cell under
``docs/results/cells/<sweep>/<cell>.json``, so a sweep's results outlive the git-ignored run
directories and a sweep can span any number of sittings on machines that are not kept.

A summary holds what every analysis reads of a cell (labels, overrides, size/compute facts, the
final eval record, a thinned eval history, the whole-split deployed evaluation, token and
parameter counts), plus what decides whether it is still valid:

* ``config_hash``: the cell's experiment as written (base + overrides, composed like ``train``
  composes it), with the machine-dependent parts dropped (``name``, ``run_dir``) or reduced to
  their last two path components (data shard/tag directories, a tokenizer file), sorted keys.
  Not the typed config, so adding a config field with a default keeps every cell valid; a
  *default* that moves numbers is a ``NUMERICS_VERSION`` bump instead.
* ``numerics_version``: :data:`NUMERICS_VERSION` of the code that trained the cell.
* ``eval_version``: the deployed evaluation's version (:data:`pipeline.experiments.deployed.VERSION`).
* ``code``: the git commit (and whether ``pipeline/`` had uncommitted changes) of the training
  code, for provenance only: commits that do not move numbers keep cells valid.

A stored cell is *current* when its numerics and evaluation versions are today's and its config
hash is the one the sweep's grid (``_grid.json``, written by ``sgtm sweep``) lists for its labels;
otherwise it is stale: ``sgtm sweep`` re-runs it and the analyses skip it with a one-line warning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

# Bump whenever a change moves training numbers (the loss, masking, init, data order, optimizer,
# a config default...): every stored cell trained before it becomes stale and is re-run.
#   1: everything before commit 10346b7 (the training loss divided by the labelled-token count)
#   2: 10346b7 "count channel": the training loss divides by the micro-batch's B x S
NUMERICS_VERSION = 2

REPO_ROOT = Path(__file__).resolve().parents[2]
STORE_ROOT = REPO_ROOT / "docs" / "results" / "cells"
GRID_FILE = "_grid.json"  # the sweep's cells (labels -> config hash), beside their summaries
SCHEMA = 1
MAX_HISTORY = 20  # eval records kept per cell (first and last always)

Log = Callable[[str], Any]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------- identity


def cell_name(labels: dict[str, Any]) -> str:
    """The summary's file stem: the labels, readable (``method=sgtm__seed=0``); stable when the
    cell's config changes, so a re-run replaces its summary instead of leaving an orphan."""
    text = "__".join(f"{k}={v}" for k, v in labels.items()) or "cell"
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def selector(labels: dict[str, Any]) -> str:
    """``k=v,k2=v2``: what ``sgtm sweep --only`` and ``--cell`` take to pick exactly this cell."""
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _tail(path: str, n: int = 2) -> str:
    return "/".join(PurePath(path).parts[-n:]).lstrip("/")


def machine_free(raw: dict) -> dict:
    """The composed experiment without what differs by machine: ``name`` and ``run_dir`` dropped,
    data shard/tag directories and a tokenizer file reduced to their last two path components
    (``bilingual_v4096/en``), which still name the prepared data set."""
    out = copy.deepcopy(raw)
    out.pop("name", None)
    out.pop("run_dir", None)
    data = out.get("data")
    if isinstance(data, dict):
        for src in data.get("sources") or []:
            if isinstance(src, dict):
                for k in ("path", "tags"):
                    if isinstance(src.get(k), str):
                        src[k] = _tail(src[k])
        tok = data.get("tokenizer")
        if isinstance(tok, str) and ("/" in tok or tok.endswith(".json")):
            data["tokenizer"] = _tail(tok)
    return out


def config_hash(raw: dict) -> str:
    """sha256 (16 hex digits) of :func:`machine_free` of the composed experiment, keys sorted."""
    text = json.dumps(machine_free(raw), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_identity(root: Path = REPO_ROOT) -> dict:
    """The commit of the code that runs now and whether ``pipeline/`` differs from it (then the
    commit alone does not reproduce the numbers)."""
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: never hold the index lock another shell's git command may need
            r = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                               text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "pipeline")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


# -------------------------------------------------------------------------------- history


def thin(history: list[dict], limit: int = MAX_HISTORY) -> list[dict]:
    """At most ``limit`` records evenly spaced by index, the first and the last always kept: the
    curve's shape and its end points without a long run's every evaluation."""
    n = len(history)
    if n <= limit:
        return list(history)
    if limit < 2:
        raise ValueError(f"thin: limit must keep the first and the last record, got {limit}")
    idx = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
    return [history[i] for i in idx]


# --------------------------------------------------------------------------------- writing


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then ``os.replace`` it: a reader
    (or ``git add`` in another shell) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the committed file private to this user
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=1, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_summary(*, sweep: str, labels: dict, overrides: list[str], raw_config: dict, facts: dict,
                  final: dict, history: list[dict], deployed_eval: dict, token_counts: dict | None,
                  param_counts: dict | None, numerics_version: int | None, code: dict | None,
                  run_key: str | None = None) -> dict:
    """A cell's summary from its parts (no file access: the sweep gathers them from the run dir)."""
    from pipeline.experiments.deployed import VERSION as EVAL_VERSION

    dep = {k: v for k, v in deployed_eval.items() if k not in ("run_dir", "checkpoint")}
    return {"schema": SCHEMA, "sweep": sweep, "cell": cell_name(labels), "labels": labels, "overrides": overrides,
            "config_hash": config_hash(raw_config), "numerics_version": numerics_version,
            "eval_version": dep.get("version", EVAL_VERSION), "code": code, "run_key": run_key,
            "facts": facts, "final": final, "history": thin(history), "history_points": len(history),
            "deployed_eval": dep, "token_counts": token_counts, "param_counts": param_counts,
            "config": machine_free(raw_config)}


def summary_path(store: Path, labels: dict) -> Path:
    return Path(store) / f"{cell_name(labels)}.json"


def write_grid(store: Path, sweep: str, sweep_file: str, cells: list[tuple[dict, str]]) -> Path:
    """``_grid.json``: every cell of the sweep (labels, config hash), so readers of the store know
    which cells are missing and which stored ones no longer match the sweep. Deterministic (no
    times): rewriting an unchanged grid leaves git clean."""
    try:
        shown = str(Path(sweep_file).resolve().relative_to(REPO_ROOT))
    except ValueError:
        shown = str(sweep_file)
    body = {"sweep": sweep, "sweep_file": shown,
            "cells": [{"cell": cell_name(lb), "labels": lb, "config_hash": h} for lb, h in cells]}
    path = Path(store) / GRID_FILE
    if path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(body, default=str)):
        return path
    return atomic_write_json(path, body)


# --------------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def staleness(summary: dict | None, want_hash: str | None = None) -> str | None:
    """Why a stored summary cannot stand for the cell (``None``: it is current). ``want_hash``:
    the config hash the sweep defines for the cell now (``None``: not checked)."""
    from pipeline.experiments.deployed import VERSION as EVAL_VERSION

    if summary is None:
        return "not stored"
    v = summary.get("numerics_version")
    if v != NUMERICS_VERSION:
        return f"trained at NUMERICS_VERSION {v}, now {NUMERICS_VERSION}"
    if summary.get("eval_version") != EVAL_VERSION:
        return f"deployed evaluation version {summary.get('eval_version')}, now {EVAL_VERSION}"
    if want_hash is not None and summary.get("config_hash") != want_hash:
        return "its config differs from the sweep's"
    return None


def decide(summary: dict | None, want_hash: str, run_done: bool, run_numerics: int | None,
           run_started: bool) -> tuple[str, str]:
    """What ``sgtm sweep`` does with one cell, and why:

    * ``skip``: its stored summary is current;
    * ``store``: its run dir finished under today's numerics: (re)write the summary, no training;
    * ``retrain``: its run dir holds a run of other numerics (finished or not): set it aside, train;
    * ``train``: nothing usable (a partial run of today's numerics resumes).
    """
    why = staleness(summary, want_hash)
    if why is None:
        return "skip", "stored summary is current"
    if run_done and run_numerics == NUMERICS_VERSION:
        return "store", why
    if (run_done or run_started) and run_numerics != NUMERICS_VERSION:
        return "retrain", f"{why}; its run dir was trained at NUMERICS_VERSION {run_numerics}"
    return "train", why


def resolve_source(path: str | Path) -> tuple[str, Path]:
    """``("runs", results.json)`` for a sweep's run output, ``("store", dir)`` for a store
    directory; a bare sweep name that is not a path resolves to ``STORE_ROOT/<name>``."""
    p = Path(path)
    if p.is_file():
        return "runs", p
    if p.is_dir():
        if (p / "results.json").is_file():
            return "runs", p / "results.json"
        if (p / GRID_FILE).is_file() or any(p.glob("*.json")):
            return "store", p
        raise FileNotFoundError(f"{p}: neither a sweep's output (results.json) nor a cell store directory")
    if len(p.parts) == 1 and (STORE_ROOT / p).is_dir():
        return "store", STORE_ROOT / p
    raise FileNotFoundError(f"{p}: no results.json (run `sgtm sweep` first) and no cell store {STORE_ROOT / p}")


def summaries(store: Path) -> dict[str, dict]:
    """``{cell name: summary}`` of a store directory (unreadable files are left out)."""
    out = {}
    for f in sorted(Path(store).glob("*.json")):
        if f.name == GRID_FILE:
            continue
        s = read_json(f)
        if isinstance(s, dict) and s.get("schema") == SCHEMA:
            s["_file"] = str(f)
            out[f.stem] = s
    return out


def store_status(store: Path) -> dict:
    """The store directory as a sweep: its name, every cell of the grid (``done`` when a current
    summary stands for it), the current summaries, and the stale ones with their reasons."""
    store = Path(store)
    grid = read_json(store / GRID_FILE)
    stored = summaries(store)
    want = {c["cell"]: c for c in (grid or {}).get("cells", [])}
    current, stale = [], []
    for name, s in stored.items():
        if grid is not None and name not in want:
            stale.append((s, "not in the sweep's grid"))
            continue
        why = staleness(s, want[name]["config_hash"] if grid is not None else None)
        (stale.append((s, why)) if why else current.append(s))
    done = {s["cell"] for s in current}
    if grid is not None:
        cells = [{"labels": c["labels"], "done": c["cell"] in done} for c in grid["cells"]]
    else:
        cells = [{"labels": s["labels"], "done": True} for s in current]
    name = (grid or {}).get("sweep") or (current[0]["sweep"] if current else store.name)
    return {"sweep": name, "grid": grid is not None, "cells": cells, "current": current, "stale": stale}


def stale_note(status: dict) -> str | None:
    """One line: how many stored cells were skipped as stale, and why."""
    if not status["stale"]:
        return None
    why: dict[str, int] = {}
    for _, reason in status["stale"]:
        why[reason] = why.get(reason, 0) + 1
    return (f"{status['sweep']}: skipped {len(status['stale'])} stale stored cell"
            f"{'s' if len(status['stale']) != 1 else ''} ("
            + "; ".join(f"{n} {r}" for r, n in sorted(why.items())) + ")")


def as_cell(summary: dict) -> dict:
    """A summary as the per-cell dict the analyses read (the shape of a results.json cell after
    ``load_cells``); ``run_dir`` is None: nothing here needs the run directory."""
    return {**summary["facts"], "key": summary.get("run_key") or summary["config_hash"],
            "config_hash": summary["config_hash"], "labels": summary["labels"], "overrides": summary["overrides"],
            "sweep": summary["sweep"], "run_dir": None, "done": True, "final": summary["final"],
            "history": summary["history"], "deployed_eval": summary["deployed_eval"],
            "token_counts": summary.get("token_counts"), "param_counts": summary.get("param_counts"),
            "numerics_version": summary["numerics_version"], "code": summary.get("code"),
            "store_file": summary.get("_file")}


def load_store(store: Path, log: Log = _stderr) -> list[dict]:
    """The current cells of a store directory, as analysis cells; stale ones are skipped with one
    warning line."""
    status = store_status(store)
    note = stale_note(status)
    if note:
        log(f"[cells] warning: {note}")
    return [as_cell(s) for s in status["current"]]


def current_index(root: Path = STORE_ROOT) -> dict[str, Path]:
    """``{config hash: summary file}`` of every current summary in every sweep of the store: a cell
    identical to one another sweep already ran (same hash) is copied, not retrained."""
    out: dict[str, Path] = {}
    for f in sorted(Path(root).glob("*/*.json")):
        if f.name == GRID_FILE:
            continue
        s = read_json(f)
        if isinstance(s, dict) and s.get("schema") == SCHEMA and staleness(s) is None:
            out.setdefault(s["config_hash"], f)
    return out
