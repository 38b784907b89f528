"""Shared by the analyses' claims: a claim row, the seed-paired comparison behind its verdict,
grouping cells and the mean / 95% interval columns of a table. One place, so every analysis
decides "holds" by the same rule (docs/experiments.md, "Intervals and verdicts")."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pipeline.experiments.common import ci_text, diff_text, per_seed, value
from pipeline.experiments.stats import diff_interval, t_interval, verdict

SETS = ("forget", "retain", "adjacent")
CAL, RAW = "deployed_calibrated", "deployed"  # the loss kinds of deployed.json that verdicts use
INTERVAL_NOTE = ("Every number is the mean over seeds with its 95% t-interval in brackets (`mean [lo, hi]`); a "
                 "verdict is `holds` when the 95% interval of the difference (paired by seed when both sides ran "
                 "the same seeds, else Welch) lies wholly on the claimed side of 0, `does not hold` when it lies "
                 "wholly on the other side, `inconclusive` otherwise (one seed gives no interval: inconclusive). "
                 "`compare` rows state a measurement, not a claim.")
DEPLOYED_NOTE = ("Losses come from each cell's final checkpoint on the whole held-out split (`deployed.json`). "
                 "Deployed model: ablated for SGTM / Gradient Routing / activation masking, the full model for "
                 "filters and no filter. `_cal` columns add the logit-calibration bias fitted on that deployed "
                 "model, by the same procedure for every method; columns without `_cal` use no bias. Verdicts "
                 "use the calibrated loss; the verdict without bias is given next to it.")


def claim(text: str, paper: str, here: str, holds: str | None, **extra: Any) -> dict:
    """One row of the claims table: the paper's statement, what was measured, the verdict."""
    return {"claim": text, "paper": paper, "here": here, "holds": holds, **extra}


def compare(a: dict, b: dict) -> tuple[dict, str]:
    """Interval and verdict of "mean(a) > mean(b)" from per-seed values."""
    iv = diff_interval(a, b)
    return iv, verdict(iv)


def group_by(cells: list[dict], key: Callable[[dict], Any]) -> dict:
    """Cells by ``key(cell)``, in first-seen order."""
    g = defaultdict(list)
    for c in cells:
        g[key(c)].append(c)
    return dict(g)


def interval_columns(row: dict, cells: list[dict], sets: tuple[str, ...] = SETS,
                     kinds: tuple[str, ...] = (CAL, RAW)) -> dict:
    """``<set>_cal`` / ``<set>`` mean, 95% half-width ``_pm`` (None for one seed), per kind."""
    for s in sets:
        for kind in kinds:
            iv = t_interval(list(per_seed(cells, lambda c, s=s, k=kind: value(c, s, k)).values()))
            if iv["mean"] is None:
                continue
            col = f"{s}_cal" if kind == CAL else s if kind == RAW else f"{s}_{kind}"
            row[col] = iv["mean"]
            row[f"{col}_pm"] = None if iv["lo"] is None else iv["hi"] - iv["mean"]
    return row


def seed_note(groups: dict) -> str:
    """The seed counts per group for the report (``3`` or ``1/3`` when groups differ)."""
    counts = sorted({len({c.get("seed", c.get("model_seed")) for c in cs}) for cs in groups.values()})
    return "/".join(str(n) for n in counts)


def per_seed_losses(groups: dict, keys: list) -> dict:
    """key -> set (forget/retain) -> calibrated/raw -> {seed: deployed loss}: what seed-paired claims compare."""
    return {x: {s: {k: per_seed(groups[x], lambda c, s=s, k=k: value(c, s, k)) for k in (CAL, RAW)}
                for s in ("forget", "retain")} for x in keys}


def on_common_seeds(x: dict, y: dict) -> tuple[dict, dict]:
    """Two groups' ``{set: {kind: {seed: loss}}}`` cut to the seeds both ran (when they share
    any): a 3-seed mean against a 1-seed value would put seed-to-seed noise into the difference;
    on common seeds the difference is paired."""
    seeds = set(x["forget"][CAL]) & set(y["forget"][CAL])
    if not seeds:
        return x, y

    def cut(g: dict) -> dict:
        return {s: {k: {sd: v for sd, v in d.items() if sd in seeds} for k, d in kinds.items()}
                for s, kinds in g.items()}

    return cut(x), cut(y)


def vs_text(a: dict, b: dict) -> str:
    """``mean [interval] vs mean [interval]; difference ...`` of two per-seed dicts."""
    return (f"{ci_text(t_interval(list(a.values())))} vs {ci_text(t_interval(list(b.values())))}; "
            f"{diff_text(diff_interval(a, b))}")
