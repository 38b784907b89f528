"""What every analysis shares: reading sweep cells, the deployed loss, writing JSON + PNG."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

ABLATING = ("sgtm", "gradient_routing", "activation_masking")


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "sgtm " + " ".join(shlex.quote(a) for a in args)


def load_cells(paths: list[str | Path]) -> list[dict]:
    """Cells of one or more sweeps (a sweep dir with results.json, or the file itself), refreshed from
    their run dirs (a cell that finished after results.json was written counts), deduplicated."""
    from pipeline.experiments.sweep import eval_history

    seen, cells = set(), []
    for p in paths:
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{p}: no results.json (run `sgtm sweep` first)")
        data = json.loads(f.read_text())
        for c in data["cells"]:
            run_dir = Path(c["run_dir"])
            final = run_dir / "final.json"
            c = dict(c, sweep=data["sweep"])
            c["final"] = json.loads(final.read_text()) if final.is_file() else None
            c["done"] = c["final"] is not None
            c["history"] = eval_history(run_dir)
            c["deployed_eval"] = deployed_record(run_dir)
            if c["key"] in seen:
                continue
            seen.add(c["key"])
            cells.append(c)
    return cells


def deployed_record(run_dir: str | Path) -> dict | None:
    from pipeline.experiments.deployed import load

    return load(run_dir)


def ensure_deployed(cells: list[dict], log=print) -> list[dict]:
    """Give every finished cell its whole-split deployed evaluation (computed once, cached in the
    run dir): the numbers every verdict uses."""
    from pipeline.experiments.deployed import ensure

    for c in cells:
        if c["done"]:
            c["deployed_eval"] = ensure(c["run_dir"], c["final"].get("step"), log=log)
    return cells


def finished(paths: list[str | Path], log=print) -> list[dict]:
    """Finished cells of the sweeps, each with its deployed evaluation."""
    return ensure_deployed([c for c in load_cells(paths) if c["done"]], log=log)


def coverage_note(paths: list[str | Path]) -> str:
    """Which share of each sweep's cells the analysis saw (a partly run sweep says so)."""
    parts = []
    for p in paths:
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        data = json.loads(f.read_text())
        done = sum(1 for c in data["cells"] if (Path(c["run_dir"]) / "final.json").is_file())
        parts.append(f"{data['sweep']}: {done} of {len(data['cells'])} cells finished")
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
    if cell["strategy"] != "none":
        return cell["strategy"]
    return {"none": "no_filter", "weak": "weak_filter", "strict": "strict_filter"}[cell["filter"]]


def deployed_kind(cell: dict) -> str:
    """The loss that describes the deployed model: calibrated after ablation for the methods that
    ablate, the full model for filters and plain training."""
    return "calibrated" if cell["strategy"] in ABLATING else "full"


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
