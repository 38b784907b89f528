"""Training throughput: strategies ``none`` / ``sgtm`` / ``gradient_routing`` on the same engine and
the same batches, at several sizes and TP degrees, against an independent reference
(``tools/reference_sgtm.py``), with repetitions interleaved.

Each measured configuration is one process tree started from here (TP ranks are separate
processes), in this order per repetition: for each size, for each TP, every strategy; then the
reference (plain, then SGTM) at that size. Per configuration and repetition the figure is
tokens per step / the median step time of the timed steps (after warm-up); across repetitions
the median and the range are reported. Ratios are computed per repetition (same repetition,
back to back) and their median is reported.

Peak memory is the peak resident set size (``getrusage`` ``ru_maxrss``) of the measured
process, summed over TP ranks; it includes the interpreter and the imports (torch, DeepSpeed,
megatron-core), so the table also shows the growth over the resident size after set-up
(engine built, batches loaded), which is what training itself adds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tools" / "reference_sgtm.py"

# Sizes that fit a 2-core CPU box (GPT-Neo family, BPE 4096 so the bundled bilingual data fits).
# forget: 1 head, 64 units per block (the demo's partition).
SIZES: dict[str, dict] = {
    "tiny-1m": {"base": "models/tiny-1m.yaml"},  # d=128, 4 blocks, 8 heads, d_ff 512: 1.3M params
    "small-4m": {"base": "models/tiny-1m.yaml", "d_model": 256, "d_ff": 1024},  # 4 blocks: 4.2M params
}
STRATEGIES = ("none", "sgtm", "gradient_routing")
SHORT = {"none": "none", "sgtm": "sgtm", "gradient_routing": "gr", "activation_masking": "am"}


def experiment(size: str, strategy: str, tp: int, micro_batch: int, seq_len: int,
               device: str = "cpu", precision: str = "fp32", forget_heads: int = 1,
               forget_units: int = 64, model: dict | None = None) -> dict:
    """The benchmark's experiment config (a dict for ``load_config(data=...)``): the demo's
    settings (ZeRO-1, AdamW lr 2e-3, per-partition clipping at 1.0, embeddings and norms masked
    for forget data) with the given size/strategy/TP."""
    return {
        "name": f"bench-{size}-{strategy}-tp{tp}",
        "model": {**(model or SIZES[size]), "max_seq_len": seq_len},
        "sgtm": {"strategy": strategy, "domains": [{"name": "forget", "heads": forget_heads,
                                                     "units": forget_units}],
                 "joint_update": "non_forget"},
        "engine": {"tensor_parallel": tp, "zero_stage": 1, "precision": precision, "device": device,
                   "micro_batch_size": micro_batch, "grad_clip": 1.0},
        "optimizer": {"lr": 2.0e-3, "warmup_steps": 10},
        "train": {"steps": 1000, "seed": 0},
    }


# ----------------------------------------------------------------------------------- batches


def synthetic_batches(n: int, micro_batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Mixed-mode packed batches with the bundled bilingual data's shares (measured from its
    loader: ~50% unlabelled, ~14% retain, ~36% forget tokens), documents of 20-400 tokens."""
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
                u = float(torch.rand(1, generator=g))
                modes[b, s:s + length] = 0 if u < 0.50 else (1 if u < 0.64 else 2)
                docs[b, s:s + length] = d
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


def _env(nprocs: int, threads: int | None) -> dict:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pipeline(spec: dict, nprocs: int, threads: int | None, timeout: float = 900) -> list[dict]:
    """Run ``pipeline.bench.worker`` on ``nprocs`` local ranks (loopback gloo, or NCCL on GPU)."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(nprocs):
        env = _env(nprocs, threads)
        env.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        if spec["config"]["engine"].get("device") == "cpu":
            env["GLOO_SOCKET_IFNAME"] = "lo"
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "pipeline.bench.worker", json.dumps(spec)],
                                       env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(rank)
    if failed:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        tail = (out / f"rank{failed[0]}.log").read_text()[-3000:]
        raise RuntimeError(f"benchmark worker failed ({spec['config']['name']}, ranks {failed}):\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nprocs)]


def run_reference(model: dict, strategy: str, batches: str, out: Path, warmup: int, steps: int,
                  threads: int | None, forget_heads: int = 1, forget_units: int = 64,
                  timeout: float = 900) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "reference.json"
    cmd = [sys.executable, str(REFERENCE), "--batches", batches, "--json", str(result), "--strategy", strategy,
           "--d-model", str(model["d_model"]), "--n-layers", str(model["n_layers"]),
           "--n-heads", str(model["n_heads"]), "--d-ff", str(model["d_ff"]),
           "--vocab", str(model["padded_vocab_size"]), "--seq-len", str(model["max_seq_len"]),
           "--forget-heads", str(forget_heads), "--forget-units", str(forget_units),
           "--warmup", str(warmup), "--steps", str(steps)]
    with open(out / "reference.log", "w") as log:
        rc = subprocess.run(cmd, env=_env(1, threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    if rc != 0:
        raise RuntimeError(f"reference harness failed:\n{(out / 'reference.log').read_text()[-3000:]}")
    return json.loads(result.read_text())


def resolved_model(model: dict) -> dict:
    """The model section with defaults filled in (d_ff, padded vocab, parameter count)."""
    from pipeline.config import load_config

    cfg = load_config(None, [], data={"model": model}).model
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_ff": cfg.d_ff,
            "padded_vocab_size": cfg.padded_vocab_size, "max_seq_len": cfg.max_seq_len,
            "params": cfg.num_params()}


# -------------------------------------------------------------------------------- measurement


def measurement(ranks: list[dict]) -> dict:
    """One repetition of one configuration, from its ranks' reports."""
    r0 = ranks[0]
    step = statistics.median(r0["step_times"])
    return {
        "tokens_per_s": r0["tokens_per_step"] / step,
        "step_s": step,
        "peak_rss_mib": sum(r["peak_rss_mib"] for r in ranks),
        "train_rss_mib": sum(r["peak_rss_mib"] - r["setup_rss_mib"] for r in ranks),
        "threads": r0["threads"], "params": r0["params"], "losses": r0["losses"],
        **({"peak_gpu_mib": max(r["peak_gpu_mib"] for r in ranks)} if "peak_gpu_mib" in r0 else {}),
    }


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


def benchmark(sizes: list[str], tps: list[int], strategies: list[str], reps: int, warmup: int, steps: int,
              micro_batch: int, seq_len: int, data: str = "bilingual", reference: bool = True,
              doc_mask: bool = True, log=print, workdir: str | None = None) -> dict:
    """Run the interleaved benchmark; returns raw measurements and the summary."""
    cores = os.cpu_count() or 1
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        n = warmup + steps
        t0 = time.perf_counter()
        if data == "bilingual":
            batches = bilingual_batches(n, micro_batch, seq_len, tmp)
        else:
            batches = synthetic_batches(n, micro_batch, seq_len, 4096)
        import torch

        modes = torch.cat([b["modes"].reshape(-1) for b in batches])
        mode_share = {"unlabelled": float((modes == 0).float().mean()), "retain": float((modes == 1).float().mean()),
                      "forget": float((modes >= 2).float().mean())}
        batch_file = str(Path(tmp) / "batches.pt")
        torch.save(batches, batch_file)
        log(f"batches: {n} x [{micro_batch}, {seq_len}] ({data}) in {time.perf_counter() - t0:.1f}s; "
            f"token modes {', '.join(f'{k} {v:.0%}' for k, v in mode_share.items())}")
        raw: dict[str, list[dict]] = {}
        job = 0
        for rep in range(reps):
            for size in sizes:
                model = SIZES[size]
                for tp in tps:
                    for strategy in strategies:
                        key = f"{size}|pipeline|tp{tp}|{strategy}"
                        spec = {"config": experiment(size, strategy, tp, micro_batch, seq_len, model=model),
                                "batches": batch_file, "warmup": warmup, "steps": steps, "doc_mask": doc_mask,
                                "out": str(Path(tmp) / f"job{job}")}
                        m = measurement(run_pipeline(spec, tp, max(1, cores // tp)))
                        raw.setdefault(key, []).append(m)
                        job += 1
                        log(f"rep {rep + 1}/{reps} {key}: {m['tokens_per_s']:,.0f} tokens/s, "
                            f"peak RSS {m['peak_rss_mib']:,.0f} MiB (+{m['train_rss_mib']:,.0f} training)")
                if reference:
                    resolved = resolved_model({**model, "max_seq_len": seq_len})
                    for strategy in ("none", "sgtm"):
                        key = f"{size}|reference|tp1|{strategy}"
                        r = run_reference(resolved, strategy, batch_file, Path(tmp) / f"job{job}", warmup, steps,
                                          cores)
                        m = measurement([r])
                        raw.setdefault(key, []).append(m)
                        job += 1
                        log(f"rep {rep + 1}/{reps} {key}: {m['tokens_per_s']:,.0f} tokens/s, "
                            f"peak RSS {m['peak_rss_mib']:,.0f} MiB (+{m['train_rss_mib']:,.0f} training)")
    settings = {"sizes": sizes, "tp": tps, "strategies": strategies, "reps": reps, "warmup": warmup,
                "steps": steps, "micro_batch": micro_batch, "seq_len": seq_len, "data": data,
                "doc_mask": doc_mask, "reference": reference, "mode_share": mode_share}
    result = {"settings": settings, "machine": machine(), "load_average_after": load_average(),
              "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - started, 1),
              "raw": raw}
    result.update(summarize(raw, sizes, tps, strategies, reference))
    return result


# ------------------------------------------------------------------------------------ summary


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _paired(raw: dict, a: str, b: str, field: str) -> list[float]:
    return [x[field] / y[field] for x, y in zip(raw[a], raw[b])]


def summarize(raw: dict, sizes: list[str], tps: list[int], strategies: list[str], reference: bool) -> dict:
    rows = []
    for key, ms in raw.items():
        size, impl, tp, strategy = key.split("|")
        tok = _spread([m["tokens_per_s"] for m in ms])
        rows.append({"size": size, "impl": impl, "tp": int(tp[2:]), "strategy": strategy,
                     "params": ms[0]["params"], "threads": ms[0]["threads"],
                     "tokens_per_s": tok[0], "tokens_per_s_min": tok[1], "tokens_per_s_max": tok[2],
                     "peak_rss_mib": statistics.median(m["peak_rss_mib"] for m in ms),
                     "train_rss_mib": statistics.median(m["train_rss_mib"] for m in ms),
                     **({"peak_gpu_mib": statistics.median(m["peak_gpu_mib"] for m in ms)}
                        if "peak_gpu_mib" in ms[0] else {}),
                     "reps": len(ms)})
    ratios = []
    for size in sizes:
        for tp in tps:
            base = f"{size}|pipeline|tp{tp}|none"
            for strategy in strategies:
                if strategy == "none" or base not in raw:
                    continue
                key = f"{size}|pipeline|tp{tp}|{strategy}"
                ratios.append(_ratio_row(raw, key, base, f"{SHORT.get(strategy, strategy)} / none", size, tp))
        if reference:
            for strategy in ("none", "sgtm"):
                ours, ref = f"{size}|pipeline|tp1|{strategy}", f"{size}|reference|tp1|{strategy}"
                if ours in raw and ref in raw:
                    ratios.append(_ratio_row(raw, ours, ref, f"pipeline TP=1 {strategy} / reference {strategy}",
                                             size, 1))
    out: dict = {"rows": rows, "ratios": ratios}
    sgtm = [r for r in ratios if r["what"] == "sgtm / none"]
    if sgtm:  # headline figures: the worst case over sizes and TP degrees
        out["sgtm_vs_none_tokens_per_s"] = round(min(r["tokens_per_s"] for r in sgtm), 4)
        out["sgtm_vs_none_peak_mem"] = round(max(r["peak_rss"] for r in sgtm), 4)
        out["sgtm_vs_none_train_mem"] = round(max(r["train_rss"] for r in sgtm), 4)
    gr = [r for r in ratios if r["what"] == "gr / none"]
    if gr:
        out["gr_vs_none_tokens_per_s"] = round(min(r["tokens_per_s"] for r in gr), 4)
    vs_ref = [r for r in ratios if r["what"].startswith("pipeline TP=1 sgtm / reference")]
    if vs_ref:
        out["pipeline_vs_reference_tokens_per_s"] = round(min(r["tokens_per_s"] for r in vs_ref), 4)
    return out


def _ratio_row(raw: dict, a: str, b: str, what: str, size: str, tp: int) -> dict:
    tok = _spread(_paired(raw, a, b, "tokens_per_s"))
    mem = _paired(raw, a, b, "peak_rss_mib")
    train = _paired(raw, a, b, "train_rss_mib")
    return {"size": size, "tp": tp, "what": what, "tokens_per_s": round(tok[0], 4),
            "tokens_per_s_min": round(tok[1], 4), "tokens_per_s_max": round(tok[2], 4),
            "peak_rss": round(statistics.median(mem), 4), "train_rss": round(statistics.median(train), 4)}


# ----------------------------------------------------------------------------------- markdown


def markdown(result: dict, command: str) -> str:
    s = result["settings"]
    share = ", ".join(f"{k} {v:.0%}" for k, v in s["mode_share"].items())
    lines = [
        f"### {result['date']}: `{command}`",
        "",
        f"Machine: {result['machine']}; load average after the run {result['load_average_after']}. "
        f"Batches: {s['micro_batch']} x {s['seq_len']} tokens ({s['data']} data, token modes {share}; "
        f"document-masked attention {'on' if s['doc_mask'] else 'off'}), the same batches for every row. "
        f"{s['reps']} interleaved repetitions of {s['warmup']} warm-up + {s['steps']} timed steps, each in a "
        f"fresh process tree; tokens/s = tokens per step / median step time; median over repetitions "
        f"[min-max]. Peak RSS: max resident set size of the benchmark process(es) (summed over TP ranks), "
        f"including ~0.5 GiB per process of interpreter and imports; \"+train\": growth over the RSS after "
        f"set-up (engine built, batches loaded). Wall time {result['seconds'] / 60:.1f} min.",
        "",
        "| size | implementation | TP | strategy | threads/rank | tokens/s | peak RSS MiB | +train MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['size']} ({r['params'] / 1e6:.2f}M) | {r['impl']} | {r['tp']} | {r['strategy']} | "
                     f"{r['threads']} | {r['tokens_per_s']:,.0f} [{r['tokens_per_s_min']:,.0f}-"
                     f"{r['tokens_per_s_max']:,.0f}] | {r['peak_rss_mib']:,.0f} | {r['train_rss_mib']:,.0f} |")
    lines += ["", "Ratios (per repetition, median [min-max]; memory: median):", "",
              "| size | TP | ratio | tokens/s | peak RSS | +train RSS |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["ratios"]:
        lines.append(f"| {r['size']} | {r['tp']} | {r['what']} | {r['tokens_per_s']:.3f} "
                     f"[{r['tokens_per_s_min']:.3f}-{r['tokens_per_s_max']:.3f}] | {r['peak_rss']:.3f} | "
                     f"{r['train_rss']:.3f} |")
    return "\n".join(lines) + "\n"


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
