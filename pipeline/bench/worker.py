"""One measured configuration of the pipeline's engine, run in its own process (one per TP rank):

    python -m pipeline.bench.worker '<spec json>'

The spec names the config (a dict for ``load_config(data=...)`` plus overrides), the batch file,
warm-up and timed steps, and where to write ``rank<r>.json``. Every rank times the whole
``train_step`` (forward, backward, per-partition clipping, AdamW) with ``time.perf_counter``; the
loss is read back every step (``float(loss)``), which on CUDA also synchronises.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(spec: dict) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.engine.engine import build_engine, train_step

    cfg = load_config(None, spec.get("overrides", []), data=spec["config"])
    state = build_engine(cfg)
    batches = torch.load(spec["batches"])
    if not spec.get("doc_mask", True):
        batches = [{k: v for k, v in b.items() if k != "doc_ids"} for b in batches]
    device = state.dist.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_rss = current_rss_mib()
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    times, losses = [], []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = float(train_step(state, [b]))
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    result = {
        "impl": "pipeline", "strategy": cfg.sgtm.strategy, "tp": state.dist.tp_size, "rank": state.dist.rank,
        "step_times": times, "tokens_per_step": int(batches[0]["input_ids"].numel()) // state.dist.tp_size
        * state.dist.tp_size,
        "params": int(cfg.model.num_params()), "setup_rss_mib": setup_rss, "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(), "losses": [losses[0], losses[-1]],
    }
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["device_name"] = torch.cuda.get_device_name()
    return result


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = run(spec)
    out = os.path.join(spec["out"], f"rank{result['rank']}.json")
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
