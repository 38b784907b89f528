"""Synthetic sweep directories: what ``sgtm sweep`` and ``sgtm deployed`` leave behind, written
with given losses, so the analyses run on known inputs."""

from __future__ import annotations

import json
from pathlib import Path


def synthetic_sweep(tmp_path: Path, cells: list[tuple], name: str = "syn", extra: dict | None = None) -> Path:
    """results.json + per-cell final.json + deployed.json with given losses: analyses run on known inputs.
    ``cells``: (method, seed, {set: (deployed_calibrated, deployed[, full])}[, {row field: value}]); a row
    field ``forget_unlabelled`` becomes the cell's cached token count (tokens.json)."""
    from pipeline.experiments.deployed import VERSION

    strategies = {"sgtm": "sgtm", "gradient_routing": "gradient_routing", "weak_filter": "none",
                  "no_filter": "none"}
    filters = {"weak_filter": "weak"}
    rows = []
    for i, (method, seed, losses, *more) in enumerate(cells):
        fields = dict(more[0]) if more else {}
        run = tmp_path / f"{name}_cell{i}"
        run.mkdir()
        if "forget_unlabelled" in fields:
            n = fields.pop("forget_unlabelled")
            (run / "tokens.json").write_text(json.dumps({"forget_unlabelled": n, "forget_labelled": 0,
                                                         "forget_total": n, "total": 10 * n + 1}))
        (run / "final.json").write_text(json.dumps({"kind": "eval", "step": 10}))
        sets = {s: {"full": v[2] if len(v) > 2 else v[1], "deployed": v[1], "deployed_calibrated": v[0], "tokens": 100}
                for s, v in losses.items()}
        (run / "deployed.json").write_text(json.dumps({"version": VERSION, "step": 10, "sets": sets,
                                                       "deployed_model": "ablated"}))
        rows.append({"key": f"{name}{i}", "labels": {"method": method, "seed": seed}, "run_dir": str(run),
                     "seed": seed, "strategy": strategies.get(method, "none"), "filter": filters.get(method, "none"),
                     "undiscovered_rate": 0.2, "d_model": 8, "n_layers": 1, "n_params": 1000, "steps": 10,
                     "tokens": 640, "tokens_per_step": 64, **(extra or {}), **fields})
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"sweep": name, "cells": rows}))
    return d
