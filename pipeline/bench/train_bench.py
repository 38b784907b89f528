"""Training throughput: strategies ``none`` / ``sgtm`` / ``gradient_routing`` on the same engine and
the same batches, at several sizes and TP degrees, against an independent reference
(``tools/reference_sgtm.py``: HF GPT-Neo, plain AdamW, the official code's homogeneous-batch
gradient zeroing), and peak memory of each configuration.

Speed: per size and TP degree, one process tree (:mod:`pipeline.bench.worker`, one process per
TP rank) runs rounds of one optimizer step per variant on the same batch, the order rotated every
round, so load drift on a shared machine hits every variant alike; ratios are medians of the
per-round paired ratios. Memory: every configuration in its own process tree; peak memory is
``ru_maxrss`` summed over TP ranks (plus the growth over the post-set-up RSS).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.backend.distributed import spawn_local_ranks
from pipeline.sgtm.methods import short_names

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tools" / "reference_sgtm.py"

# Sizes that fit a 2-core CPU box (GPT-Neo family, BPE 4096 so the bundled bilingual data fits).
# forget: 1 head, 64 units per block (the demo's partition).
SIZES: dict[str, dict] = {
    "tiny-1m": {"base": "models/tiny-1m.yaml"},  # d=128, 4 blocks, 8 heads, d_ff 512: 1.3M params
    "small-4m": {"base": "models/tiny-1m.yaml", "d_model": 256, "d_ff": 1024},  # 4 blocks: 4.2M params
    # for smoke tests only
    "micro": {"base": "models/tiny-1m.yaml", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 256,
              "vocab_size": 512},
}
STRATEGIES = ("none", "sgtm", "gradient_routing")
# "sgtm+detached_context": SGTM with sgtm.cross_mode_attention=detached_context (plain "sgtm" is
# the default, segment); worth measuring on --data mixed-spans, where modes change inside documents.
SHORT = {**short_names(), "sgtm+detached_context": "sgtm-dc"}


def split_variant(variant: str) -> tuple[str, str]:
    """A benchmark variant name -> (sgtm.strategy, sgtm.cross_mode_attention)."""
    strategy, _, cross = variant.partition("+")
    return strategy, cross or "segment"


def experiment(size: str, strategy: str, tp: int, micro_batch: int, seq_len: int,
               device: str = "cpu", precision: str = "fp32", forget_heads: int = 1,
               forget_units: int = 64, model: dict | None = None) -> dict:
    """The benchmark's experiment config (a dict for ``load_config(data=...)``): the demo's
    settings (ZeRO-1, AdamW lr 2e-3, per-partition clipping at 1.0, embeddings and norms masked
    for forget data) with the given size/strategy/TP."""
    return {
        "name": f"bench-{size}-{strategy}-tp{tp}",
        "model": {**(model or SIZES[size]), "max_seq_len": seq_len},
        "sgtm": {"strategy": split_variant(strategy)[0], "cross_mode_attention": split_variant(strategy)[1],
                 "domains": [{"name": "forget", "heads": forget_heads,
                                                     "units": forget_units}],
                 "joint_update": "non_forget"},
        "engine": {"tensor_parallel": tp, "zero_stage": 1, "precision": precision, "device": device,
                   "micro_batch_size": micro_batch, "grad_clip": 1.0},
        "optimizer": {"lr": 2.0e-3, "warmup_steps": 10},
        "train": {"steps": 1000, "seed": 0},
    }


# ----------------------------------------------------------------------------------- batches


def synthetic_batches(n: int, micro_batch: int, seq_len: int, vocab: int, seed: int = 0,
                      mixed_spans: bool = False) -> list[dict]:
    """Mixed-mode packed batches with the bundled bilingual data's shares (measured from its
    loader: ~50% unlabelled, ~14% retain, ~36% forget tokens), documents of 20-400 tokens.
    ``mixed_spans``: the mode changes inside documents too (spans of 8-64 tokens, as paragraph
    tagging makes), which is where the cross-mode attention rules cost something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=g)
        modes = torch.empty(micro_batch, seq_len, dtype=torch.long)
        docs = torch.empty(micro_batch, seq_len, dtype=torch.long)
        for b in range(micro_batch):
            s, d = 0, 0
            while s < seq_len:
                length = int(torch.randint(20, 400, (1,), generator=g))
                docs[b, s:s + length] = d
                t = s
                while t < min(s + length, seq_len):
                    span = int(torch.randint(8, 65, (1,), generator=g)) if mixed_spans else length
                    u = float(torch.rand(1, generator=g))
                    modes[b, t:min(t + span, s + length)] = 0 if u < 0.50 else (1 if u < 0.64 else 2)
                    t += span
                s, d = s + length, d + 1
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        out.append({"input_ids": ids, "labels": labels, "modes": modes, "doc_ids": docs})
    return out


def bilingual_batches(n: int, micro_batch: int, seq_len: int, workdir: str) -> list[dict]:
    """Real batches from the bundled bilingual TinyStories (BPE 4096, the demo's tagging)."""
    from pipeline.data.loader import build_loader
    from pipeline.data.prepare import prepare_bilingual

    data = prepare_bilingual(Path(workdir) / "data", seq_len=seq_len)
    loader = build_loader(data, micro_batch_size=micro_batch, seq_len=seq_len, seed=0)
    keep = ("input_ids", "labels", "modes", "doc_ids")
    batches = [{k: v for k, v in next(loader).items() if k in keep} for _ in range(n)]
    loader.close()
    return batches


# ---------------------------------------------------------------------------------- launching


def _env(nprocs: int, threads: int | None, device: str = "cpu") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device == "cpu":  # DeepSpeed's CPU accelerator; never set on a GPU machine
        env.setdefault("DS_ACCELERATOR", "cpu")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_pipeline(spec: dict, nprocs: int, threads: int | None, timeout: float = 900) -> list[dict]:
    """Run ``pipeline.bench.worker`` on ``nprocs`` local ranks (loopback gloo, or NCCL on GPU)."""
    out = Path(spec["out"])
    device = spec["config"]["engine"].get("device", "cpu")
    try:
        spawn_local_ranks([sys.executable, "-m", "pipeline.bench.worker", json.dumps(spec)], nprocs, out,
                          env=_env(nprocs, threads, device), cwd=ROOT, timeout=timeout, device=device)
    except RuntimeError as e:
        raise RuntimeError(f"benchmark worker failed ({spec['config']['name']}): {e}") from None
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]


def run_reference(model: dict, strategy: str, batches: str, out: Path, warmup: int, steps: int,
                  threads: int | None, timeout: float = 900) -> dict:
    """``tools/reference_sgtm.py`` alone in its own process (for its peak memory)."""
    out.mkdir(parents=True, exist_ok=True)
    result = out / "reference.json"
    cmd = [sys.executable, str(REFERENCE), *reference_args(model, batches), "--json", str(result),
           "--strategy", strategy, "--warmup", str(warmup), "--steps", str(steps)]
    with open(out / "reference.log", "w") as log:
        rc = subprocess.run(cmd, env=_env(1, threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    if rc != 0:
        raise RuntimeError(f"reference harness failed:\n{(out / 'reference.log').read_text()[-3000:]}")
    return json.loads(result.read_text())


def resolved_model(model: dict) -> dict:
    """The model section with defaults filled in (d_ff, padded vocab, parameter count)."""
    from pipeline.config import load_config
    from pipeline.model.shapes import num_params

    cfg = load_config(None, [], data={"model": model}).model
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_ff": cfg.d_ff,
            "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size, "max_seq_len": cfg.max_seq_len,
            "params": num_params(cfg)}


# -------------------------------------------------------------------------------- measurement


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def model_section(size: str) -> dict:
    """A benchmark size name (``SIZES``) or a model fragment under configs/models (``wiki-254m``)."""
    if size in SIZES:
        return SIZES[size]
    name = size if size.endswith((".yaml", ".yml")) else f"models/{size}.yaml"
    return {"base": name}


def benchmark(sizes: list[str], tps: list[int], strategies: list[str], rounds: int, warmup: int, reps: int,
              mem_steps: int, micro_batch: int, seq_len: int, data: str = "bilingual", reference: bool = True,
              doc_mask: bool = True, memory: bool = True, log=print, workdir: str | None = None,
              device: str = "cpu", precision: str = "fp32") -> dict:
    """Run the benchmark (speed processes, then memory processes); returns raw data and summary."""
    cores = os.cpu_count() or 1
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        n = max(warmup + rounds, 2 + mem_steps)
        t0 = time.perf_counter()
        if data == "bilingual":
            batches = bilingual_batches(n, micro_batch, seq_len, tmp)
        else:
            vocab = min(resolved_model({**model_section(s), "max_seq_len": seq_len})["vocab_size"] for s in sizes)
            batches = synthetic_batches(n, micro_batch, seq_len, vocab, mixed_spans=data == "mixed-spans")
        import torch

        modes = torch.cat([b["modes"].reshape(-1) for b in batches])
        mode_share = {"unlabelled": float((modes == 0).float().mean()), "retain": float((modes == 1).float().mean()),
                      "forget": float((modes >= 2).float().mean())}
        batch_file = str(Path(tmp) / "batches.pt")
        torch.save(batches, batch_file)
        log(f"batches: {n} x [{micro_batch}, {seq_len}] ({data}) in {time.perf_counter() - t0:.1f}s; "
            f"token modes {', '.join(f'{k} {v:.0%}' for k, v in mode_share.items())}")
        speed: dict[str, list[float]] = {}  # key -> step times (pooled over repetitions, in round order)
        cpu: dict[str, list[float]] = {}  # key -> process CPU seconds per step, same order
        info: dict[str, dict] = {}
        job = 0
        for rep in range(reps):
            for size in sizes:
                model = model_section(size)
                resolved = resolved_model({**model, "max_seq_len": seq_len})
                for tp in tps:
                    spec = {"mode": "speed", "strategies": strategies, "batches": batch_file, "warmup": warmup,
                            "rounds": rounds, "doc_mask": doc_mask, "out": str(Path(tmp) / f"job{job}"),
                            "config": experiment(size, strategies[0], tp, micro_batch, seq_len, device, precision,
                                                 model=model)}
                    if reference and tp == 1:
                        spec["reference_args"] = reference_args(resolved, batch_file)
                    t1 = time.perf_counter()
                    r0 = run_pipeline(spec, tp, max(1, cores // tp))[0]
                    job += 1
                    for variant, times in r0["step_times"].items():
                        impl, strategy = variant.split("|")
                        key = f"{size}|{impl}|tp{tp}|{strategy}"
                        speed.setdefault(key, []).extend(times)
                        cpu.setdefault(key, []).extend(r0["cpu_times"][variant])
                        info[key] = {"tokens_per_step": r0["tokens_per_step"], "threads": r0["threads"],
                                     "params": r0["params"] if impl == "pipeline" else r0["reference_params"]}
                    summary = ", ".join(f"{v.split('|')[0][:3]} {v.split('|')[1]} "
                                        f"{r0['tokens_per_step'] / statistics.median(t):,.0f}"
                                        for v, t in r0["step_times"].items())
                    log(f"speed rep {rep + 1}/{reps} {size} TP={tp} ({time.perf_counter() - t1:.0f}s): "
                        f"tokens/s {summary}")
        mem: dict[str, dict] = {}
        if memory:
            for size in sizes:
                model = model_section(size)
                for tp in tps:
                    for strategy in strategies:
                        key = f"{size}|pipeline|tp{tp}|{strategy}"
                        spec = {"mode": "memory", "batches": batch_file, "warmup": 2, "steps": mem_steps,
                                "doc_mask": doc_mask, "out": str(Path(tmp) / f"job{job}"),
                                "config": experiment(size, strategy, tp, micro_batch, seq_len, device, precision,
                                                     model=model)}
                        ranks = run_pipeline(spec, tp, max(1, cores // tp))
                        job += 1
                        mem[key] = _memory(ranks)
                        log(f"memory {key}: peak RSS {mem[key]['peak_rss_mib']:,.0f} MiB "
                            f"(+{mem[key]['train_rss_mib']:,.0f} training)")
                if reference:
                    resolved = resolved_model({**model, "max_seq_len": seq_len})
                    for strategy in ("none", "sgtm"):
                        key = f"{size}|reference|tp1|{strategy}"
                        r = run_reference(resolved, strategy, batch_file, Path(tmp) / f"job{job}", 2, mem_steps,
                                          cores)
                        job += 1
                        mem[key] = _memory([r])
                        log(f"memory {key}: peak RSS {mem[key]['peak_rss_mib']:,.0f} MiB "
                            f"(+{mem[key]['train_rss_mib']:,.0f} training)")
    settings = {"sizes": sizes, "tp": tps, "strategies": strategies, "reps": reps, "rounds": rounds,
                "warmup": warmup, "mem_steps": mem_steps, "micro_batch": micro_batch, "seq_len": seq_len,
                "data": data, "doc_mask": doc_mask, "reference": reference, "mode_share": mode_share,
                "device": device, "precision": precision}
    result = {"settings": settings, "machine": machine(), "load_average_after": load_average(),
              "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - started, 1),
              "raw": {"step_times": speed, "cpu_times": cpu, "memory": mem, "info": info}}
    result.update(summarize(speed, mem, info, sizes, tps, strategies, cpu))
    return result


def _memory(ranks: list[dict]) -> dict:
    out = {"peak_rss_mib": sum(r["peak_rss_mib"] for r in ranks),
           "train_rss_mib": sum(r["peak_rss_mib"] - r["setup_rss_mib"] for r in ranks)}
    if "peak_gpu_mib" in ranks[0]:
        out["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in ranks)
    return out


def reference_args(model: dict, batches: str, forget_heads: int = 1, forget_units: int = 64) -> list[str]:
    return ["--batches", batches, "--d-model", str(model["d_model"]), "--n-layers", str(model["n_layers"]),
            "--n-heads", str(model["n_heads"]), "--d-ff", str(model["d_ff"]),
            "--vocab", str(model["padded_vocab_size"]), "--seq-len", str(model["max_seq_len"]),
            "--forget-heads", str(forget_heads), "--forget-units", str(forget_units)]


# ------------------------------------------------------------------------------------ summary


def summarize(speed: dict, mem: dict, info: dict, sizes: list[str], tps: list[int], strategies: list[str],
              cpu: dict | None = None) -> dict:
    rows = []
    for key, times in speed.items():
        size, impl, tp, strategy = key.split("|")
        tokens = info[key]["tokens_per_step"]
        q1, med, q3 = _quartiles(times)
        row = {"size": size, "impl": impl, "tp": int(tp[2:]), "strategy": strategy, "params": info[key]["params"],
               "threads": info[key]["threads"], "steps": len(times), "step_s": round(med, 4),
               "tokens_per_s": round(tokens / med, 1), "tokens_per_s_q1": round(tokens / q3, 1),
               "tokens_per_s_q3": round(tokens / q1, 1)}
        row.update({k: round(v, 1) for k, v in mem.get(key, {}).items()})
        rows.append(row)
    ratios = []

    def add(what: str, size: str, tp: int, num: str, den: str) -> None:
        """Speed ratio num/den from paired steps (same round: same batch, seconds apart)."""
        if num not in speed or den not in speed:
            return
        paired = [d / n for n, d in zip(speed[num], speed[den])]
        q1, med, q3 = _quartiles(paired)
        row = {"size": size, "tp": tp, "what": what, "tokens_per_s": round(med, 4),
               "tokens_per_s_q1": round(q1, 4), "tokens_per_s_q3": round(q3, 4),
               "of_medians": round(statistics.median(speed[den]) / statistics.median(speed[num]), 4)}
        if cpu and num in cpu and den in cpu:
            row["cpu_time"] = round(statistics.median([d / n for n, d in zip(cpu[num], cpu[den])]), 4)
        if num in mem and den in mem:
            row["peak_rss"] = round(mem[num]["peak_rss_mib"] / mem[den]["peak_rss_mib"], 4)
            row["train_rss"] = round(mem[num]["train_rss_mib"] / max(mem[den]["train_rss_mib"], 1e-9), 4)
            if "peak_gpu_mib" in mem[num]:
                row["peak_gpu"] = round(mem[num]["peak_gpu_mib"] / mem[den]["peak_gpu_mib"], 4)
        ratios.append(row)

    for size in sizes:
        for tp in tps:
            for strategy in strategies:
                if strategy != "none":
                    add(f"{SHORT.get(strategy, strategy)} / none", size, tp, f"{size}|pipeline|tp{tp}|{strategy}",
                        f"{size}|pipeline|tp{tp}|none")
        add("reference sgtm / reference none", size, 1, f"{size}|reference|tp1|sgtm", f"{size}|reference|tp1|none")
        for strategy in ("none", "sgtm"):
            add(f"pipeline TP=1 {strategy} / reference {strategy}", size, 1, f"{size}|pipeline|tp1|{strategy}",
                f"{size}|reference|tp1|{strategy}")
    out: dict = {"rows": rows, "ratios": ratios}
    sgtm = [r for r in ratios if r["what"] == "sgtm / none"]
    if sgtm:  # headline figures: the worst case over sizes and TP degrees
        out["sgtm_vs_none_tokens_per_s"] = min(r["tokens_per_s"] for r in sgtm)
        if all("peak_rss" in r for r in sgtm):
            out["sgtm_vs_none_peak_mem"] = max(r["peak_rss"] for r in sgtm)
            out["sgtm_vs_none_train_mem"] = max(r["train_rss"] for r in sgtm)
        if all("peak_gpu" in r for r in sgtm):
            out["sgtm_vs_none_peak_gpu_mem"] = max(r["peak_gpu"] for r in sgtm)
    gr = [r for r in ratios if r["what"] == "gr / none"]
    if gr:
        out["gr_vs_none_tokens_per_s"] = min(r["tokens_per_s"] for r in gr)
    vs_ref = [r for r in ratios if r["what"] == "pipeline TP=1 sgtm / reference sgtm"]
    if vs_ref:
        out["pipeline_vs_reference_tokens_per_s"] = min(r["tokens_per_s"] for r in vs_ref)
    return out


# ----------------------------------------------------------------------------------- markdown


def _fmt(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict, command: str) -> str:
    s = result["settings"]
    share = ", ".join(f"{k} {v:.0%}" for k, v in s["mode_share"].items())
    lines = [
        f"### {result['date']}: `{command}`",
        "",
        f"Machine: {result['machine']}; load average after the run {result['load_average_after']} "
        f"(wall time {result['seconds'] / 60:.1f} min). Batches: {s['micro_batch']} x {s['seq_len']} tokens "
        f"({s['data']} data; token modes {share}; document-masked attention "
        f"{'on' if s['doc_mask'] else 'off'}), the same batch for every variant of a round.",
        f"Speed: {s['reps']} process(es) per size and TP, each {s['warmup']} warm-up + {s['rounds']} timed rounds; "
        f"a round is one optimizer step of every variant (strategies switched on one engine; at TP=1 also "
        f"the reference, plain and SGTM) on the same batch, order rotated each round. tokens/s = tokens per "
        f"step / median step time [quartiles]. Ratios: median over rounds of the paired step-time ratio "
        f"[quartiles] ('of medians': ratio of the median step times; 'CPU-time speed': the same paired ratio "
        f"of process CPU seconds per step, less disturbed by other load).",
        f"Memory: one process (tree) per configuration, 2 + {s['mem_steps']} steps; peak RSS = getrusage "
        f"ru_maxrss of the process, summed over TP ranks, including ~0.5 GiB per process of interpreter and "
        f"imports (torch, DeepSpeed, megatron-core / transformers); '+train' = peak minus the RSS after "
        f"set-up (model, optimizer and batches loaded).",
        "",
        "| size | implementation | TP | strategy | threads/rank | tokens/s [quartiles] | peak RSS MiB | +train MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['size']} ({r['params'] / 1e6:.2f}M) | {r['impl']} | {r['tp']} | {r['strategy']} | "
                     f"{r['threads']} | {r['tokens_per_s']:,.0f} [{r['tokens_per_s_q1']:,.0f}-"
                     f"{r['tokens_per_s_q3']:,.0f}] | {_fmt(r.get('peak_rss_mib'))} | "
                     f"{_fmt(r.get('train_rss_mib'))} |")
    lines += ["", "| size | TP | ratio | tokens/s [quartiles] | of medians | CPU-time speed | peak RSS | +train RSS |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["ratios"]:
        lines.append(f"| {r['size']} | {r['tp']} | {r['what']} | {r['tokens_per_s']:.3f} "
                     f"[{r['tokens_per_s_q1']:.3f}-{r['tokens_per_s_q3']:.3f}] | {r['of_medians']:.3f} | "
                     f"{_fmt(r.get('cpu_time'), '.3f')} | "
                     f"{_fmt(r.get('peak_rss'), '.3f')} | {_fmt(r.get('train_rss'), '.3f')} |")
    return "\n".join(lines) + "\n"


def replace_section(doc: Path, heading: str, block: str) -> None:
    """Replace (or add at the end) the ``heading`` section of ``doc`` with ``block``: benchmarks that
    re-measure one table; other sections untouched."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = f"{heading}\n{block}\n"
    if start is None:
        doc.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    doc.write_text("".join(lines[:start]) + section + ("\n" + rest if rest else ""))


def add_to_section(doc: Path, heading: str, block: str, intro: str = "") -> None:
    """Append ``block`` at the end of the ``heading`` section of ``doc`` (created at the end of the
    file if missing); other sections are left untouched."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        if not text.endswith("\n"):
            text += "\n"
        doc.write_text(text + f"\n{heading}\n" + (f"{intro}\n" if intro else "") + "\n" + block)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[:end]
    while body and body[-1].strip() == "":
        body.pop()
    rest = lines[end:]
    doc.write_text("".join(body) + "\n\n" + block + ("\n" + "".join(rest) if rest else ""))
