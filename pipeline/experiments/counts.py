"""Token and parameter counts of a run: what the sweep stores with each cell and what the leakage,
MoE and matched-budget analyses read. Here, not in an analysis, so the sweep (below the analyses)
can compute them without importing one."""

from __future__ import annotations

import json
from pathlib import Path


def count_tokens(run: str | Path | dict) -> dict:
    """Replay a run's training batches (the loader is a pure function of config and seed) and count
    target tokens by true label x mode; cached in ``<run>/tokens.json``. ``run``: a run dir or an
    analysis cell (a stored cell carries its counts: no run dir needed)."""
    import yaml

    from pipeline.codes import Mode
    from pipeline.config import load_config
    from pipeline.data.loader import build_loader

    if isinstance(run, dict):
        if run.get("token_counts") is not None:
            return run["token_counts"]
        if not run.get("run_dir"):
            raise FileNotFoundError(f"cell {run.get('labels')}: no token counts stored and no run dir")
        run = run["run_dir"]
    run_dir = Path(run)
    cache = run_dir / "tokens.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = load_config(data=yaml.safe_load((run_dir / "config.yaml").read_text()))
    loader = build_loader(cfg.data, seed=cfg.train.seed, micro_batch_size=cfg.engine.micro_batch_size,
                          seq_len=cfg.model.max_seq_len)
    counts = {"forget_unlabelled": 0, "forget_labelled": 0, "forget_total": 0, "total": 0}
    try:
        for _ in range(cfg.train.steps * cfg.engine.grad_accum_steps):
            b = next(loader)
            valid = b["labels"] != -100
            forget = (b["true_labels"] == 1) & valid  # true forget, first domain
            counts["total"] += int(valid.sum())
            counts["forget_total"] += int(forget.sum())
            counts["forget_unlabelled"] += int((forget & (b["modes"] == Mode.UNLABELLED)).sum())
            counts["forget_labelled"] += int((forget & (b["modes"] >= Mode.FORGET)).sum())
    finally:
        loader.close()
    cache.write_text(json.dumps(counts, indent=2))
    return counts


def param_counts(cell: dict) -> dict:
    """Total and per-token (active) parameters of a cell's model and its forget MLP parameters (the
    forget units' rows/columns plus whole forget experts, in every forget block), from the resolved
    ``config.yaml`` in its run dir; without it, the sweep's total only."""
    import yaml

    from pipeline.config import ModelConfig, SGTMConfig, assign_domains, from_dict
    from pipeline.model.shapes import active_params, expert_params, num_params

    if cell.get("param_counts"):  # a stored cell (pipeline/experiments/cells.py) carries them
        return cell["param_counts"]
    f = Path(cell.get("run_dir") or ".") / "config.yaml"
    if not cell.get("run_dir") or not f.is_file():
        return {"params_total": cell.get("n_params"), "params_active": None, "forget_mlp_params": None}
    raw = yaml.safe_load(f.read_text())
    m = from_dict(ModelConfig, raw["model"], f"{f}: model")
    s = from_dict(SGTMConfig, raw["sgtm"], f"{f}: sgtm")
    per_unit = (3 if m.mlp == "swiglu" else 2) * m.d_model + (2 if m.mlp == "swiglu" else 1) * bool(m.bias)
    forget = sum(len(d.layers) * (len(d.units) * per_unit + len(d.experts) * expert_params(m))
                 for d in assign_domains(m, s)) if s.strategy != "none" else 0
    return {"params_total": num_params(m), "params_active": active_params(m), "forget_mlp_params": forget}
