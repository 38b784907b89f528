"""Loader throughput on this machine: tokens/s for 0 (in-process), 1 and 2 DataLoader workers.

    .venv/bin/python tools/bench_data.py [--batches 300] [--micro-batch-size 16] [--seq-len 256]

Data: the bundled bilingual TinyStories, BPE 4096, the demo's tagging (20% of Spanish undiscovered,
25% of English retain). Also reports the cost of an exact resume (replaying to batch k).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from pipeline.data.loader import build_loader
from pipeline.data.prepare import prepare_bilingual


def measure(cfg: dict, workers: int, batches: int, micro_batch_size: int, seq_len: int) -> dict:
    loader = build_loader({**cfg, "num_workers": workers}, micro_batch_size=micro_batch_size, seq_len=seq_len)
    started = time.perf_counter()
    next(loader)  # worker start-up and shuffle-buffer fill
    first = time.perf_counter() - started
    started = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(loader)["input_ids"].numel()
    seconds = time.perf_counter() - started
    state = loader.state_dict()
    loader.close()
    resumed = build_loader(
        {**cfg, "num_workers": workers}, micro_batch_size=micro_batch_size, seq_len=seq_len
    )
    resumed.load_state_dict(state)
    started = time.perf_counter()
    next(resumed)
    resume = time.perf_counter() - started
    resumed.close()
    return {
        "workers": workers,
        "tokens_per_s": round(tokens / seconds),
        "first_batch_s": round(first, 2),
        "resume_after_batches": batches + 1,
        "resume_first_batch_s": round(resume, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--training-tokens-per-s",
        type=float,
        default=4000.0,
        help="what the demo model consumes (assumption: 2-4k tokens/s on 2 CPU cores)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cfg = prepare_bilingual(tmp, seq_len=args.seq_len)
        print(f"prepared bilingual shards (BPE 4096 + 2 sources) in {time.perf_counter() - started:.1f}s")
        for workers in args.workers:
            row = measure(cfg, workers, args.batches, args.micro_batch_size, args.seq_len)
            row["x_training"] = round(row["tokens_per_s"] / args.training_tokens_per_s, 1)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
