"""Metrics on rank 0: a JSONL file (the source of truth for reports), TensorBoard scalars, and a
progress bar with tokens/s, loss and lr. Other ranks get a logger that does nothing."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, disable=None)
        self._last = (time.perf_counter(), 0)

    def log(self, record: dict) -> None:
        """One JSON line; numeric fields also go to TensorBoard under ``kind/name``."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def progress(self, step: int, tokens: int, loss: float, lr: float) -> None:
        if not self.enabled or self._bar is None:
            return
        now = time.perf_counter()
        t0, tok0 = self._last
        rate = (tokens - tok0) / max(now - t0, 1e-9)
        self._last = (now, tokens)
        self._bar.n = step
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
