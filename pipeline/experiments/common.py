"""What every analysis shares: reading sweep cells, the deployed loss, writing JSON + PNG."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from pipeline.sgtm.methods import ablates, method_name


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "sgtm " + " ".join(shlex.quote(a) for a in args)


def load_cells(paths: list[str | Path], log=None) -> list[dict]:
    """Cells of one or more sweeps, each source either a sweep's run output (a dir with
    results.json, or the file; refreshed from the run dirs, so a cell that finished after
    results.json was written counts) or a cell store directory (``docs/results/cells/<name>``, or
    the bare name; its current summaries, stale ones skipped with one warning line), deduplicated
    by config: the one loader every analysis reads through."""
    from pipeline.experiments import cells as store

    seen, cells = set(), []
    for p in paths:
        kind, where = store.resolve_source(p)
        if kind == "store":
            rows = store.load_store(where, **({"log": log} if log else {}))
        else:
            rows = _load_results(where)
        for c in rows:
            key = c.get("config_hash") or c["key"]
            if key in seen:
                continue
            seen.add(key)
            cells.append(c)
    return cells


def _load_results(f: Path) -> list[dict]:
    from pipeline.experiments.sweep import eval_history

    data = json.loads(f.read_text())
    out = []
    for c in data["cells"]:
        run_dir = Path(c["run_dir"])
        final = run_dir / "final.json"
        c = dict(c, sweep=data["sweep"])
        c["final"] = json.loads(final.read_text()) if final.is_file() else None
        c["done"] = c["final"] is not None
        c["history"] = eval_history(run_dir)
        c["deployed_eval"] = deployed_record(run_dir)
        out.append(c)
    return out


def sweep_status(path: str | Path) -> dict:
    """A source's sweep name and every cell of its grid with ``done`` (run output: final.json
    exists; store: a current summary stands for it), plus ``stale`` (store only): why stored cells
    were skipped."""
    from pipeline.experiments import cells as store

    kind, where = store.resolve_source(path)
    if kind == "store":
        st = store.store_status(where)
        return {"sweep": st["sweep"], "cells": st["cells"], "stale": store.stale_note(st), "store": True,
                "grid": st["grid"]}
    data = json.loads(where.read_text())
    return {"sweep": data["sweep"], "stale": None, "store": False, "grid": True,
            "cells": [{"labels": c["labels"], "done": (Path(c["run_dir"]) / "final.json").is_file()}
                      for c in data["cells"]]}


def deployed_record(run_dir: str | Path) -> dict | None:
    from pipeline.experiments.deployed import load

    return load(run_dir)


def ensure_deployed(cells: list[dict], log=print) -> list[dict]:
    """Give every finished cell its whole-split deployed evaluation (computed once, cached in the
    run dir): the numbers every verdict uses."""
    from pipeline.experiments.deployed import ensure

    for c in cells:
        if c["done"] and c.get("run_dir"):  # a stored cell carries its record (no run dir here)
            c["deployed_eval"] = ensure(c["run_dir"], c["final"].get("step"), log=log)
    return cells


def finished(paths: list[str | Path], log=print) -> list[dict]:
    """Finished cells of the sweeps, each with its deployed evaluation."""
    return ensure_deployed([c for c in load_cells(paths) if c["done"]], log=log)


def coverage_note(paths: list[str | Path]) -> str:
    """Which share of each sweep's cells the analysis saw (a partly run sweep says so), and how many
    stored cells were skipped as stale."""
    parts = []
    for p in paths:
        st = sweep_status(p)
        done = sum(c["done"] for c in st["cells"])
        where = " (cell store)" if st["store"] else ""
        text = (f"{st['sweep']}{where}: {done} of {len(st['cells'])} cells finished" if st["grid"]
                else f"{st['sweep']}{where}: {done} cells stored (no grid file: the sweep's size is unknown)")
        if st["stale"]:
            text += f"; {st['stale'].split(': ', 1)[1]}"
        parts.append(text)
    return "Cells: " + "; ".join(parts) + "."


def value(cell: dict, name: str, kind: str = "deployed_calibrated") -> float | None:
    """A set's loss from the cell's whole-split deployed evaluation. ``kind``: ``full`` (the
    unablated model), ``deployed`` (what ships: ablated for SGTM / Gradient Routing / activation
    masking, full otherwise; no bias) or ``deployed_calibrated`` (the same model with the fitted
    output bias; one procedure for every method)."""
    rec = cell.get("deployed_eval")
    if not rec:
        return None
    v = rec["sets"].get(name, {}).get(kind)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def per_seed(cells: list[dict], fn) -> dict[int, float]:
    """{seed: fn(cell)} over cells of one group (one value per seed)."""
    out = {}
    for c in cells:
        v = fn(c)
        if v is not None:
            if c["seed"] in out:
                raise ValueError(f"two cells of one group share seed {c['seed']}: {c['run_dir']}")
            out[c["seed"]] = float(v)
    return out


def ci_text(iv: dict, digits: int = 3) -> str:
    """``mean [lo, hi]`` (95% t-interval over seeds) or ``mean (1 seed)``."""
    if iv.get("mean") is None:
        return "-"
    m = f"{iv['mean']:.{digits}f}"
    if iv.get("lo") is None:
        return f"{m} (1 seed)"
    return f"{m} [{iv['lo']:.{digits}f}, {iv['hi']:.{digits}f}]"


def diff_text(iv: dict, digits: int = 3) -> str:
    if iv.get("mean") is None:
        return "-"
    m = f"{iv['mean']:+.{digits}f}"
    if iv.get("lo") is None:
        return f"difference {m} (no interval: one seed)"
    kind = "paired" if iv.get("paired") else "Welch"
    return f"difference {m} [{iv['lo']:+.{digits}f}, {iv['hi']:+.{digits}f}] ({iv['n']} seeds, {kind})"


def method_of(cell: dict) -> str:
    m = cell["labels"].get("method")
    if m is not None:
        return str(m)
    return method_name(cell["strategy"], cell["filter"])


def deployed_kind(cell: dict) -> str:
    """The loss that describes the deployed model: calibrated after ablation for the methods that
    ablate, the full model for filters and plain training."""
    return "calibrated" if ablates(cell["strategy"]) else "full"


def loss(record: dict | None, name: str, kind: str) -> float | None:
    if not record:
        return None
    v = record.get(f"{name}_{kind}")
    if v is None and kind == "calibrated":
        v = record.get(f"{name}_ablated")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def deployed(cell: dict, name: str, record: dict | None = None) -> float | None:
    return loss(record if record is not None else cell["final"], name, deployed_kind(cell))


def size_label(cell: dict) -> str:
    return f"d{cell['d_model']}xL{cell['n_layers']} ({cell['n_params'] / 1e6:.2f}M)"


def write_analysis(out: str | Path, name: str, payload: dict[str, Any], fig=None) -> Path:
    """``<out>/<name>.analysis.json`` (+ ``<name>.png``). Payload keys the report reads: title,
    command, table (list of rows), claims (paper claim vs measured), notes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"analysis": name, **payload}
    if fig is not None:
        png = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        payload["png"] = png.name
    path = out / f"{name}.analysis.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


# What a summary keeps of an analysis: the numbers the report shows, not curves or paths.
SUMMARY_KEYS = ("analysis", "title", "command", "seeds", "setup", "claims", "table", "fits", "notes", "results_brief",
                "param_norms", "headroom")
SKIP_COLUMNS = {"run_dir", "confusion", "checkpoint"}


def summarize(analysis: dict) -> dict:
    """The small, committed part of an analysis (what `sgtm report` writes to docs/results/); here,
    beside write_analysis, so an analysis can write its own summary without importing the report."""
    out = {k: analysis[k] for k in SUMMARY_KEYS if k in analysis}
    if "results" in analysis and isinstance(analysis["results"], dict):  # single-run analyses: scalars only
        out["results_brief"] = {k: v for k, v in analysis["results"].items()
                                if isinstance(v, (int, float, str)) and k not in SKIP_COLUMNS}
    return out


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e5):
            return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)
