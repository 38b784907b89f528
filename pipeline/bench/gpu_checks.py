"""The GPU checks of the parallelism issue, as one script (run by ``tools/gpu_checks.sh``).

    python -m pipeline.bench.gpu_checks [--out-dir runs/gpu_checks] [--doc docs/benchmarks.md]
        [--skip isolation|throughput|memory ...] [--device cpu --tiny]

1. **Isolation on the GPU** (TP=1, bf16, ZeRO-1, binding per-partition clipping, deterministic
   kernels): ``sgtm check-isolation``'s four runs (:mod:`pipeline.commands.isolation`).
2. **Throughput**: SGTM / none tokens/s and MFU at 125M, 254M and 1B (``tools/bench_gpu.sh``).
3. **Memory**: the Llama-3-8B shape at TP=1, ZeRO-1, bf16, micro-batch 1: peak
   ``torch.cuda.max_memory_allocated`` over two steps against ``tools/memory_estimate.py``'s total
   for the same config. When the estimate does not fit in 85% of the card, the check keeps the
   8B block shape and removes blocks until it does (and says how many it kept), so the ratio still
   tests the per-block terms.

Each stage runs in its own process (a CUDA OOM or a stuck NCCL init cannot take the others down).
Figures go to ``OUT_DIR/gpu_checks.json`` and, with ``--doc``, to the '## GPU checks' section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## GPU checks"
EIGHT_B = "configs/experiments/llama3_8b_8xh100.yaml"
MEMORY_OVERRIDES = ["engine.tensor_parallel=1", "engine.zero_stage=1", "engine.micro_batch_size=1",
                    "engine.grad_accum_steps=1", "model.max_seq_len=2048"]


def _run(cmd: list[str], log) -> subprocess.CompletedProcess:
    log(f"[gpu-checks] $ {' '.join(cmd)}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def isolation(args, log) -> dict:
    overrides = [f"engine.device={args.device}", "engine.grad_clip=0.05", "engine.zero_stage=1",
                 f"engine.precision={'bf16' if args.device == 'cuda' else 'fp32'}", "engine.tensor_parallel=1"]
    if not args.tiny:  # the wiki-125m shape (configs/models/wiki-125m.yaml) at a 512-token context
        overrides += ["model.n_layers=12", "model.d_model=768", "model.n_heads=32", "model.d_ff=3072",
                      "model.vocab_size=50257", "model.max_seq_len=512",
                      "sgtm.domains=[{name: forget, heads: 4, units: 384}]"]
    out = args.out_dir / "isolation.json"
    proc = _run([sys.executable, "-m", "pipeline", "check-isolation", "--config", "configs/experiments/core_tiny.yaml",
                 "--steps", str(args.steps), "--json", str(out), *overrides], log)
    if not out.exists():
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(out.read_text()), "overrides": overrides}


def throughput(args, log) -> dict:
    out = args.out_dir / "throughput.json"
    cmd = ["bash", "tools/bench_gpu.sh", "--json", str(out), "--out", "-", "--python", sys.executable]
    cmd += ["--device", "cpu", "--tiny"] if args.tiny else ["--sizes", "wiki-125m wiki-254m llama-1b",
                                                             "--rounds", str(args.rounds)]
    proc = _run(cmd, log)
    if not out.exists():
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    data = json.loads(out.read_text())
    return {"rows": data["rows"], "ratios": data["ratios"], "peak_tflops": data["peak_tflops"],
            "device_name": data["device_name"], "command": data["command"]}


def estimate(overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "tools/memory_estimate.py", EIGHT_B, "--gpus", "1", "--json",
                           "--overrides", *overrides], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)[0]


def memory(args, log) -> dict:
    if args.device != "cuda":
        return {"skipped": "peak GPU memory needs CUDA"}
    import torch

    card = torch.cuda.get_device_properties(0).total_memory / 1024**3
    overrides = list(MEMORY_OVERRIDES)
    est = estimate(overrides)
    layers = 32
    while est["total"] > 0.85 * card and layers > 1:
        layers //= 2
        est = estimate([*overrides, f"model.n_layers={layers}"])
    if layers != 32:
        overrides.append(f"model.n_layers={layers}")
    proc = _run([sys.executable, "-m", "pipeline.bench.gpu_checks", "--measure-memory", *overrides], log)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "estimate": est,
                "overrides": overrides}
    measured = json.loads(lines[-1])
    return {"overrides": overrides, "blocks": layers, "card_gib": card, "estimate_gib": est["total"],
            "estimate": est, "measured_gib": measured["peak_gib"],
            "estimate_over_measured": est["total"] / measured["peak_gib"]}


def measure_memory(overrides: list[str]) -> None:
    """Two SGTM steps of the config on this GPU; prints the peak allocated GiB as JSON."""
    import torch

    from pipeline.codes import Mode
    from pipeline.commands.isolation import isolation_batch
    from pipeline.config import load_config
    from pipeline.engine.engine import build_engine, train_step

    cfg = load_config(str(ROOT / EIGHT_B), overrides)
    state = build_engine(cfg)
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):
        batch = isolation_batch(step, 1, Mode.FORGET, cfg.engine.micro_batch_size, cfg.model.max_seq_len,
                                cfg.model.vocab_size)
        train_step(state, [batch])
    torch.cuda.synchronize()
    print(json.dumps({"peak_gib": torch.cuda.max_memory_allocated() / 1024**3}))


def markdown(result: dict, command: str) -> str:
    lines = [f"### {result['date']}: `{command}`", ""]
    iso = result.get("isolation", {})
    if "verdict" in iso:
        lay = iso["layout"]
        lines.append(f"- Isolation ({lay['precision']}, TP={lay['tp']}, ZeRO-{lay['zero']}, clip {lay['clip']} "
                     f"per partition, {iso['steps']} steps): **{iso['verdict']}** ({iso['leaked_tensors']} retain/"
                     f"joint tensors changed with forget content; {iso['forget_tensors_changed']} forget tensors "
                     f"changed; the repeated run differed in {iso['repeat_differs']}).")
    elif iso:
        lines.append(f"- Isolation: {iso.get('error') or iso.get('skipped')}")
    thr = result.get("throughput", {})
    if "rows" in thr:
        lines += ["", f"{thr['device_name']}; matmul peak {thr['peak_tflops']:.3g} TFLOP/s.", "",
                  "| size | strategy | tokens/s | MFU |", "| --- | --- | --- | --- |"]
        for r in thr["rows"]:
            lines.append(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['strategy']} | {r['tokens_per_s']:,.0f} "
                         f"| {100 * r['mfu']:.1f}% |")
        for r in thr["ratios"]:
            lines.append(f"\n{r['size']} {r['what']} tokens/s: {r['tokens_per_s']:.3f}")
    elif thr:
        lines.append(f"- Throughput: {thr.get('error')}")
    mem = result.get("memory", {})
    if "measured_gib" in mem:
        lines.append(f"\n- Memory, Llama-3-8B shape ({mem['blocks']} of 32 blocks; {', '.join(mem['overrides'])}): "
                     f"measured peak {mem['measured_gib']:.1f} GiB, estimated {mem['estimate_gib']:.1f} GiB, "
                     f"estimate/measured {mem['estimate_over_measured']:.3f} (card {mem['card_gib']:.0f} GiB).")
    elif mem:
        lines.append(f"- Memory: {mem.get('error') or mem.get('skipped')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "gpu_checks")
    p.add_argument("--doc", help="append the figures to this file's '## GPU checks' section")
    p.add_argument("--skip", nargs="*", default=[], choices=["isolation", "throughput", "memory"])
    p.add_argument("--steps", type=int, default=20, help="isolation steps")
    p.add_argument("--rounds", type=int, default=6, help="throughput rounds")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models (a CPU check of this script)")
    p.add_argument("--measure-memory", nargs="*", metavar="OVERRIDE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_memory is not None:
        measure_memory(args.measure_memory)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result: dict = {"date": time.strftime("%Y-%m-%d"), "device": args.device}
    for name, stage in (("isolation", isolation), ("throughput", throughput), ("memory", memory)):
        if name not in args.skip:
            t0 = time.perf_counter()
            result[name] = stage(args, log)
            result[name]["seconds"] = round(time.perf_counter() - t0, 1)
            log(f"[gpu-checks] {name}: {json.dumps(result[name])[:300]}")
    command = "tools/gpu_checks.sh " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out_dir / "gpu_checks.json").write_text(json.dumps({"command": command, **result}, indent=1))
    block = markdown(result, command)
    print(block)
    if args.doc:
        from pipeline.bench.train_bench import add_to_section

        add_to_section(Path(args.doc), SECTION, block)
    iso = result.get("isolation", {})
    return 0 if iso.get("verdict", "holds") == "holds" else 1


if __name__ == "__main__":
    sys.exit(main())
