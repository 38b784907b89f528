"""Metrics on rank 0: a JSONL file (the source of truth for reports), TensorBoard scalars, optional
Weights & Biases, and progress on stderr. Other ranks get a logger that does nothing.

Progress is a tqdm bar on a terminal; when stderr is not a terminal (a SLURM log, ``nohup``, a
pipe) a bar prints nothing useful, so every ``train.log_every`` steps gets one plain timestamped
line instead (``logging.console``): step/total, loss, tokens/s since the previous line, learning
rate, the per-partition gradient norms (retain, each forget domain by name; when clipping per
partition), elapsed time and ETA. Evaluation and calibration add their own lines (``note``).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

from pipeline.config import WandbConfig


def require_wandb(key: str = "logging.wandb.enabled") -> None:
    """One line, before anything runs, when W&B is asked for but not installed (it is optional)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"{key}: true, but the wandb package is not installed; install it with "
                         "pip install 'sgtm-pipeline[wandb]' (or set it to false)") from None


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, console: str = "auto", start_tokens: int = 0,
                 wandb: WandbConfig | None = None, run_name: str = "", run_config: dict | None = None,
                 stream: TextIO | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self._tb = None
        self._bar = None
        self._wandb = None
        self._lines = False
        if not enabled:
            return
        self._stream = stream if stream is not None else sys.stderr
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None
        if console == "auto":
            console = "bar" if self._stream.isatty() else "lines"
        if console == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=self._stream)
        self._lines = console == "lines"
        if wandb is not None and wandb.enabled:
            self._wandb = self._start_wandb(Path(run_dir), wandb, run_name, run_config or {})
        now = time.perf_counter()
        self._start = (now, start_step)
        self._last = (now, start_tokens)

    @staticmethod
    def _start_wandb(run_dir: Path, cfg: WandbConfig, run_name: str, run_config: dict):
        """One W&B run per run directory: its id is kept in ``wandb_run_id`` so ``--resume``
        continues the same W&B run. Steps are a metric (``step``), not W&B's own counter, so the
        steps a resumed run repeats after its checkpoint are accepted."""
        require_wandb()
        import wandb

        from pipeline.components.checkpoint import atomic_write_text

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, group=cfg.group,
                         tags=list(cfg.tags) or None, mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow",
                         config=run_config)
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, record: dict) -> None:
        """One JSON line; numeric fields also go to TensorBoard and W&B under ``kind/name``."""
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "step" not in record:
            return
        kind = record.get("kind", "train")
        scalars = {f"{kind}/{key}": value for key, value in record.items()
                   if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log({"step": record["step"], **scalars})

    def note(self, text: str) -> None:
        """A progress message (evaluation, calibration, resume): above the bar on a terminal,
        a timestamped line otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        elif self._lines:
            self._print(text)

    def _print(self, text: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {text}", file=self._stream, flush=True)

    def progress(self, step: int, tokens: int, loss: float, lr: float,
                 grad_norms: dict[str, float] | None = None) -> None:
        """Tokens/s over the steps since the previous call; ETA from this process's mean step time."""
        if not self.enabled or (self._bar is None and not self._lines):
            return
        now = time.perf_counter()
        t0, tok0 = self._last
        rate = (tokens - tok0) / max(now - t0, 1e-9)
        self._last = (now, tokens)
        start_t, start_step = self._start
        elapsed = now - start_t
        eta = (self.total_steps - step) * elapsed / max(step - start_step, 1)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
            self._bar.refresh()
            return
        parts = [f"step {step}/{self.total_steps}", f"loss {loss:.4f}", f"{rate:,.0f} tok/s", f"lr {lr:.2e}"]
        if grad_norms:
            parts.append("grad norm " + " ".join(f"{name} {value:.3g}" for name, value in grad_norms.items()))
        parts += [f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
        self._print(" | ".join(parts))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()
