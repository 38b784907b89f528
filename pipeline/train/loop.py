"""The one training loop: compose engine, data, evaluation, checkpoints and metrics.

Launched the same way by ``python``, ``torchrun``, the ``deepspeed`` launcher, ``srun`` or
``mpirun`` (rank discovery is in :mod:`pipeline.backend.distributed`). Every rank runs this loop;
only rank 0 writes metrics and run files.
"""

from __future__ import annotations

import json
import platform
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline.components import checkpoint, faults
from pipeline.components.metrics import MetricsLogger, require_wandb
from pipeline.config import ExperimentConfig, to_dict
from pipeline.engine.engine import build_engine, train_step
from pipeline.engine.trainer import Trainer
from pipeline.model.shapes import num_params


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)  # skipped (train.nonfinite: skip)


class NonFiniteError(ValueError):
    """A step with a non-finite loss or gradient under ``train.nonfinite: stop`` (one line)."""


class PeerLostError(SystemExit):
    """A collective failed: another rank died or stopped answering. A ``SystemExit`` whose code
    is the one-line message: the process prints it and exits 1 (no traceback, ``finally`` blocks
    run), whatever launched it; checkpoints are untouched (the last complete one is named)."""

    def __str__(self) -> str:
        return str(self.code)


def _is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out", "Gloo",
        "gloo", "NCCL", "Broken pipe", "ProcessGroup"))


def batch_sources(micro: list[dict], source_names: list[str]) -> str:
    """Which documents a (rank's) step read: source names and document indices (a few)."""
    parts = []
    for mb in micro:
        src, doc = mb.get("source_ids"), mb.get("doc_index")
        if src is None or doc is None:
            continue
        pairs = sorted({(int(s), int(d)) for s, d in zip(src.flatten().tolist(), doc.flatten().tolist()) if s >= 0})
        parts += [f"{source_names[s] if s < len(source_names) else s}#{d}" for s, d in pairs]
    if not parts:
        return "unknown documents"
    more = f" (+{len(parts) - 8} more)" if len(parts) > 8 else ""
    return "documents " + ", ".join(parts[:8]) + more


class Preemption:
    """SIGTERM (SLURM preemption, scancel, torchrun shutdown) asks for a checkpoint at the next
    step boundary; ranks agree through an all-reduce so they stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def package_versions() -> dict:
    import deepspeed
    import megatron.core

    import pipeline

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": getattr(megatron.core, "__version__", "unknown"), "sgtm-pipeline": pipeline.__version__}


def tp_layout(model: torch.nn.Module) -> dict[str, list[int]]:
    """How each parameter is sharded ([partition_dim, stride], replicated K/V rows add
    [replicas, tail]: ``tp_state.layout_of``), so checkpoints can be consolidated without
    rebuilding the model."""
    from pipeline.model.tp_state import layout_of

    return {n: layout_of(p) for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}


def eval_sets(cfg: ExperimentConfig) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Held-out eval batches and calibration batches per set; fixed and identical on every rank.
    Calibration data comes from the training split by default (``eval.calibration.split``)."""
    from pipeline.data.loader import build_eval_batches

    ev, cal = cfg.eval, cfg.eval.calibration
    names = [("forget" if len(cfg.data.domains) == 1 else f"forget:{d}", "forget", d) for d in cfg.data.domains]
    names += [("retain", "retain", None), ("adjacent", "adjacent", None)]
    evals, calib = {}, {}
    for name, which, domain in names:
        kw = dict(domain=domain, seq_len=cfg.model.max_seq_len, batch_size=ev.batch_size)
        batches = build_eval_batches(cfg.data, which, max_batches=ev.batches, **kw)
        if batches:
            evals[name] = batches
        if ev.calibrate:
            fit = build_eval_batches(cfg.data, which, max_batches=cal.batches, split=cal.split, **kw)
            if fit:
                calib[name] = fit
    return evals, calib


def calibrates(cfg: ExperimentConfig, final: bool) -> bool:
    """Whether this evaluation fits the logit calibration: ``eval.calibrate_at: final`` keeps the
    (costly) fit for the end of training, the only evaluation final.json and the demo's table read."""
    return cfg.eval.calibrate and (final or cfg.eval.calibrate_at == "every")


def run_eval(state: Trainer, evals, calib, step: int, run_dir: Path, log: MetricsLogger,
             final: bool = False) -> dict:
    cfg = state.cfg
    domains = list(range(len(state.partition.domains)))
    t0 = time.perf_counter()
    calibrate = calibrates(cfg, final)
    log.note(f"eval step {step}: {', '.join(evals) or 'no held-out sets'}"
             + (f"; calibrating on {', '.join(calib)}" if calibrate and calib else ""))
    report = lambda text: log.note(f"eval step {step}: {text}")  # noqa: E731
    results = state.evaluate(evals, domains, calib if calibrate else None, cfg.eval.calibration if calibrate else None,
                             report=report)
    log.note(f"eval step {step}: done in {time.perf_counter() - t0:.1f} s")
    record = {"kind": "eval", "step": step}
    for name, r in results.items():
        record[f"{name}_full"] = r.full
        record[f"{name}_ablated"] = r.ablated
        if r.calibrated is not None:
            record[f"{name}_calibrated"] = r.calibrated
    log.log(record)
    if state.dist.rank == 0:
        out = run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        for name, r in results.items():
            if name.startswith("forget"):
                np.savez_compressed(out / f"step{step:08d}_{name.replace(':', '_')}_per_token.npz",
                                    **{k: v.numpy().astype(np.float32) for k, v in r.per_token.items()})
    return record


def _norm_names(record: dict, cfg: ExperimentConfig) -> dict[str, float]:
    """The record's per-partition gradient norms under readable names (forget<d> -> domain name)."""
    domains = {f"forget{i}": d.name for i, d in enumerate(cfg.sgtm.domains)}
    names = {k.removeprefix("grad_norm_"): v for k, v in record.items() if k.startswith("grad_norm_")}
    return {domains.get(k, k): v for k, v in names.items()}


def train(cfg: ExperimentConfig, resume: bool = False, max_steps: int | None = None) -> dict:
    """Train to ``cfg.train.steps`` (or stop early after ``max_steps`` more steps, for tests);
    returns the last eval record."""
    from pipeline.data.loader import build_loader

    if cfg.data is None:
        raise ValueError("data: an experiment to train needs a data section (sources, tagging, filter)")
    if cfg.logging.wandb.enabled:
        require_wandb()  # one line now, not after the model is built
    from pipeline.data.tokenizer import load_tokenizer

    n_vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    if n_vocab > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{n_vocab} ids ({cfg.data.tokenizer})")
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # Before anything expensive: can the run write one checkpoint? (every rank probes)
    checkpoint.preflight(ckpt_dir, checkpoint.estimate_bytes(num_params(cfg.model), cfg.engine.precision))
    if resume and checkpoint.latest_tag(ckpt_dir) is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint to resume from")
    state = build_engine(cfg)
    d = state.dist
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "versions.json").write_text(json.dumps(package_versions(), indent=2))
    dist.barrier()

    loader = build_loader(cfg.data, dp_rank=d.dp_rank, dp_world_size=d.dp_size, seed=cfg.train.seed,
                          micro_batch_size=cfg.engine.micro_batch_size, seq_len=cfg.model.max_seq_len)
    progress = Progress()
    if resume:
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint to resume from")
        # model, optimizer, schedule, loader, RNG; resharded if the checkpoint's DP/TP layout differs
        client = checkpoint.restore(state.engine, ckpt_dir, tag, checkpoint.layout_of(d, cfg.engine), loader)
        progress = Progress(step=client["step"], tokens=client["tokens"],
                            nonfinite_steps=list(client.get("nonfinite_steps", [])))
        if d.rank == 0:
            old = client.get("resharded_from")
            how = f" (resharded from dp={old['dp']} tp={old['tp']} to dp={d.dp_size} tp={d.tp_size})" if old else ""
            print(f"resumed from {ckpt_dir / tag} at step {progress.step}{how}", file=sys.stderr)

    evals, calib = eval_sets(cfg)
    log = MetricsLogger(run_dir, enabled=d.rank == 0, total_steps=cfg.train.steps, start_step=progress.step,
                        start_tokens=progress.tokens, console=cfg.logging.console, wandb=cfg.logging.wandb,
                        run_name=cfg.name, run_config=to_dict(cfg))
    preempt = Preemption()
    tokens_per_step = cfg.engine.micro_batch_size * cfg.model.max_seq_len * cfg.engine.grad_accum_steps * d.dp_size

    saved_at = [-1]

    def save() -> None:
        if saved_at[0] == progress.step:
            return
        saved_at[0] = progress.step
        client = {"step": progress.step, "tokens": progress.tokens, "nonfinite_steps": progress.nonfinite_steps,
                  "config": to_dict(cfg),
                  "partition": state.partition.to_dict(), "tp_layout": tp_layout(state.model)}
        rank_state = {"loader": loader.state_dict(), "rng": checkpoint.rng_state()}
        checkpoint.save(state.engine, ckpt_dir, progress.step, client, rank_state, cfg.checkpoint.keep,
                        layout=checkpoint.layout_of(d, cfg.engine))

    last_eval: dict = {}
    stop_at = cfg.train.steps if max_steps is None else min(cfg.train.steps, progress.step + max_steps)
    t0, tokens0 = time.perf_counter(), progress.tokens
    try:
        while progress.step < stop_at:
            micro = [next(loader) for _ in range(cfg.engine.grad_accum_steps)]
            loss = train_step(state, micro, step=progress.step + 1)
            progress.step += 1
            progress.tokens += tokens_per_step
            step = progress.step
            if not state.last_step_finite:
                where = batch_sources(micro, loader.source_names)
                if cfg.train.nonfinite == "stop":
                    raise NonFiniteError(
                        f"train.nonfinite: non-finite loss or gradients at step {step} (rank {d.rank} read {where}); "
                        f"the update was not applied; stopping (resume from {checkpoint.latest_tag(ckpt_dir)} "
                        f"or set train.nonfinite=skip)")
                progress.nonfinite_steps.append(step)
                log.log({"kind": "nonfinite", "step": step, "action": "skipped", "batch": where,
                         "skipped_total": len(progress.nonfinite_steps)})
                if d.rank == 0:
                    print(f"step {step}: non-finite loss or gradients; update skipped "
                          f"({len(progress.nonfinite_steps)} so far; rank 0 read {where})", file=sys.stderr)
            if step % cfg.train.log_every == 0 or step == stop_at:
                lr = state.engine.get_lr()[0]
                value = float(loss) if state.last_step_finite else None
                record = {"kind": "train", "step": step, "loss": value, "lr": lr, "tokens": progress.tokens,
                          "tokens_per_s": (progress.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9),
                          "nonfinite_total": len(progress.nonfinite_steps)}
                if loader.skipped_shards:  # data.skip_bad_shards: counted, listed in the checkpoint
                    record["skipped_shards"] = len(loader.skipped_shards)
                if state.clipper is not None:
                    record.update(state.clipper.named_norms())  # grad_norm_retain, _forget<d>, _joint_all
                log.log(record)
                log.progress(step, progress.tokens, value if value is not None else float("nan"), lr,
                             _norm_names(record, cfg))
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
                last_eval = run_eval(state, evals, calib, step, run_dir, log)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save()
            if faults.armed("sigterm_at", step):
                faults.kill_self(signal.SIGTERM)
            if preempt.agreed(d.device):
                save()
                if d.rank == 0:
                    print(f"SIGTERM: checkpoint written at step {step}; exiting", file=sys.stderr)
                return {"preempted_at": step}
        if progress.step == cfg.train.steps:
            last_eval = run_eval(state, evals, calib, progress.step, run_dir, log, final=True)
            if d.rank == 0:
                (run_dir / "final.json").write_text(json.dumps(last_eval, indent=2))
        save()
    except RuntimeError as exc:
        if not _is_comm_failure(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail).split(". This is typically")[0][:200]
        raise PeerLostError(
            f"sgtm: error: rank {d.rank}: lost a peer after step {progress.step} (collective failed: {detail}; "
            f"engine.dist_timeout_s={cfg.engine.dist_timeout_s:g}); the job stops; restart all ranks with "
            f"--resume (last complete checkpoint: {checkpoint.latest_tag(ckpt_dir)})") from None
    finally:
        preempt.restore()
        log.close()
        loader.close()
    return last_eval
