"""Reading what a ``sgtm train`` run wrote (its run directory)."""

from __future__ import annotations

import json
from pathlib import Path


def losses(run_dir: Path) -> dict[int, float]:
    """Last logged train loss per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out
