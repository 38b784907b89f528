"""GPU throughput and MFU of ``none`` vs ``sgtm`` (run by ``tools/bench_gpu.sh``).

    python -m pipeline.bench.gpu [--sizes wiki-125m wiki-254m] [--micro-batch 16] [--seq-len 1024]
        [--rounds 10] [--doc docs/benchmarks.md] [--json FILE] [--doc-mask] [--device cpu --tiny]

Per size: one process, bf16 (DeepSpeed bf16 + ZeRO-1, AdamW, per-partition clipping), strategies
switched on one engine step by step on the same synthetic batches (GPT-2 vocabulary), then one
memory process per strategy (``torch.cuda.max_memory_allocated``). MFU = 6 * N * tokens/s / peak,
with N the model's parameter count (embeddings included, tied LM head counted once) and peak the
card's *measured* dense bf16 matmul rate (8192^3 ``torch.matmul``, best of several). Attention is
plain causal (flash path) unless ``--doc-mask`` (document-masked attention through SDPA's masked
kernel). ``--device cpu --tiny`` runs the same code on CPU with the tiny-1m model in fp32 (a
checking mode: the peak is then a fp32 CPU matmul).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GPU = "## GPU"


def matmul_peak(device: str, dtype_name: str, n: int | None = None, iters: int = 20, trials: int = 5) -> float:
    """Best measured FLOP/s of an n x n x n matmul."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["wiki-125m", "wiki-254m"], help="configs/models fragments")
    p.add_argument("--strategies", nargs="+", default=["none", "sgtm"])
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--doc-mask", action="store_true", help="document-masked attention (doc_ids in the batch)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny-1m, 2 rounds, small batch (a CPU check of this script)")
    p.add_argument("--doc", help="append the table to this file's '## GPU' section")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.rounds, args.warmup, args.mem_steps = ["tiny-1m"], 2, 1, 1
        args.micro_batch, args.seq_len = min(args.micro_batch, 4), min(args.seq_len, 128)
    if "none" not in args.strategies:
        args.strategies = ["none", *args.strategies]
    return args


def markdown(result: dict, command: str) -> str:
    s = result["settings"]
    gpu = s["device"] == "cuda"
    mem_key, mem_name = ("peak_gpu_mib", "peak GPU memory (max allocated)") if gpu else ("peak_rss_mib", "peak RSS")
    lines = [f"### {result['date']}: `{command}`", "",
             f"Device: {result['device_name']}; measured matmul peak {result['peak_tflops']:.3g} TFLOP/s "
             f"({result['peak_dtype']}). {s['precision']}, DeepSpeed ZeRO-1, batch {s['micro_batch']} x "
             f"{s['seq_len']} (synthetic, token modes {', '.join(f'{k} {v:.0%}' for k, v in s['mode_share'].items())}"
             f"), document mask {'on' if s['doc_mask'] else 'off'}; {s['warmup']} warm-up + {s['rounds']} rounds "
             f"(strategies interleaved per step on one engine). MFU = 6 N tokens/s / peak (N with embeddings).",
             "", f"| size | strategy | tokens/s [quartiles] | MFU | {mem_name} MiB |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['strategy']} | {r['tokens_per_s']:,.0f} "
                     f"[{r['tokens_per_s_q1']:,.0f}-{r['tokens_per_s_q3']:,.0f}] | {100 * r['mfu']:.1f}% | "
                     f"{r.get(mem_key, 0):,.0f} |")
    lines += ["", f"| size | ratio | tokens/s [quartiles] | {mem_name} |", "| --- | --- | --- | --- |"]
    for r in result["ratios"]:
        lines.append(f"| {r['size']} | {r['what']} | {r['tokens_per_s']:.3f} [{r['tokens_per_s_q1']:.3f}-"
                     f"{r['tokens_per_s_q3']:.3f}] | {r.get('peak_gpu', r.get('peak_rss', 0)):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.bench import train_bench

    precision = "bf16" if args.device == "cuda" else "fp32"
    command = "tools/bench_gpu.sh " + " ".join(sys.argv[1:] if argv is None else argv)
    plan = {"sizes": args.sizes, "strategies": args.strategies, "device": args.device, "precision": precision,
            "micro_batch": args.micro_batch, "seq_len": args.seq_len, "rounds": args.rounds,
            "doc_mask": args.doc_mask}
    if args.dry_run:
        print(json.dumps({"plan": plan}))
        return 0
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    peak_dtype = "bfloat16" if args.device == "cuda" else "float32"
    peak = matmul_peak(args.device, peak_dtype)
    log(f"matmul peak: {peak / 1e12:.1f} TFLOP/s ({peak_dtype})")
    result = train_bench.benchmark(args.sizes, [1], args.strategies, args.rounds, args.warmup, 1, args.mem_steps,
                                   args.micro_batch, args.seq_len, data="synthetic", reference=False,
                                   doc_mask=args.doc_mask, log=log, device=args.device, precision=precision)
    for r in result["rows"]:
        r["mfu"] = 6 * r["params"] * r["tokens_per_s"] / peak
    if args.device == "cuda":
        import torch

        result["device_name"] = torch.cuda.get_device_name()
    else:
        result["device_name"] = f"CPU: {train_bench.machine()}"
    result.update(peak_tflops=peak / 1e12, peak_dtype=peak_dtype)
    by = {(r["size"], r["strategy"]): r for r in result["rows"]}
    result["mfu"] = {f"{size}|{s}": by[(size, s)]["mfu"] for size, s in by}
    if ("wiki-254m", "none") in by:
        result["mfu_254m_none"] = by[("wiki-254m", "none")]["mfu"]
    block = markdown(result, command)
    print(block)
    if args.doc:
        train_bench.add_to_section(Path(args.doc), GPU, block)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, **result}, indent=1))
    sgtm = [r["tokens_per_s"] for r in result["ratios"] if r["what"] == "sgtm / none"]
    if sgtm:
        log(f"sgtm/none tokens/s (worst size): {min(sgtm):.3f} (target >= 0.97); "
            f"MFU: {', '.join(f'{k} {100 * v:.1f}%' for k, v in result['mfu'].items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
