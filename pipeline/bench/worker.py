"""The benchmark's measuring process (one per TP rank), started by :mod:`pipeline.bench.train_bench`:

    python -m pipeline.bench.worker '<spec json>'

``mode: speed`` builds one engine and runs ``rounds`` rounds; every round takes one optimizer
step of every variant on the *same* batch, in an order rotated each round: the strategies
(switched on the same engine through ``Transformer.strategy``, which is all a strategy changes)
and, at TP=1, the independent reference (``tools/reference_sgtm.py``, plain and SGTM). Step-level
interleaving makes the ratios robust to load drift on a shared machine.

``mode: memory`` builds the engine for one strategy and trains ``steps`` steps: its peak resident
set size is that configuration's peak memory.

Each step is timed around the whole ``train_step`` (forward, backward, per-partition clipping,
AdamW) with ``time.perf_counter`` (and the process's CPU time, ``time.process_time``, which a
busy machine disturbs less); the loss is read back every step (``float(loss)``; on CUDA
the device is synchronised as well).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_sgtm", ROOT / "tools" / "reference_sgtm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def run(spec: dict) -> dict:
    import torch

    from pipeline.bench.train_bench import split_variant
    from pipeline.config import load_config
    from pipeline.engine.engine import build_engine, train_step
    from pipeline.model.shapes import num_params

    cfg = load_config(None, spec.get("overrides", []), data=spec["config"])
    state = build_engine(cfg)
    batches = torch.load(spec["batches"])
    if not spec.get("doc_mask", True):  # plain causal attention over the packed rows
        batches = [{k: v for k, v in b.items() if k != "doc_ids"} for b in batches]
        cfg.model.document_masking = False
    device = state.dist.device
    tokens = int(batches[0]["input_ids"].numel())
    result = {"rank": state.dist.rank, "tp": state.dist.tp_size, "tokens_per_step": tokens,
              "params": int(num_params(cfg.model)), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        result["device_name"] = torch.cuda.get_device_name()

    def pipeline_step(strategy: str, b: dict) -> tuple[float, float, float]:
        state.model.strategy, state.partition.sgtm.cross_mode_attention = split_variant(strategy)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = float(train_step(state, [b]))
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0, loss

    if spec["mode"] == "memory":
        setup_rss = current_rss_mib()
        times = []
        for i in range(int(spec["warmup"]) + int(spec["steps"])):
            dt, _, _ = pipeline_step(cfg.sgtm.strategy, batches[i % len(batches)])
            if i >= int(spec["warmup"]):
                times.append(dt)
        result.update(setup_rss_mib=setup_rss, peak_rss_mib=peak_rss_mib(), step_times=times)
    else:
        variants = [("pipeline", s) for s in spec["strategies"]]
        ref, labels = None, None
        if spec.get("reference_args") and state.dist.world_size == 1:
            reference = load_reference()
            ref = reference.ReferenceSGTM(reference.parser().parse_args(spec["reference_args"]))
            rounds_total = int(spec["warmup"]) + int(spec["rounds"])
            labels = reference.step_labels(batches, rounds_total)
            variants += [("reference", "none"), ("reference", "sgtm")]
        times: dict[str, list[float]] = {f"{impl}|{s}": [] for impl, s in variants}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        losses: dict[str, list[float]] = {k: [] for k in times}
        for r in range(int(spec["warmup"]) + int(spec["rounds"])):
            b = batches[r % len(batches)]
            k = r % len(variants)
            for impl, strategy in variants[k:] + variants[:k]:
                if impl == "pipeline":
                    dt, dc, loss = pipeline_step(strategy, b)
                else:
                    ref.strategy = strategy
                    c0, t0 = time.process_time(), time.perf_counter()
                    loss = ref.step(b, labels[r])
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                key = f"{impl}|{strategy}"
                losses[key].append(loss)
                if r >= int(spec["warmup"]):
                    times[key].append(dt)
                    cpu[key].append(dc)
        result.update(step_times=times, cpu_times=cpu, losses={k: [v[0], v[-1]] for k, v in losses.items()})
        if ref is not None:
            result["reference_params"] = sum(p.numel() for p in ref.model.parameters())
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = run(spec)
    with open(os.path.join(spec["out"], f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
