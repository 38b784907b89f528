"""Where a training step's time goes: torch profiler tables for ``none`` and ``sgtm`` on one engine.

    python -m pipeline.bench.profile '<spec json>'     (started by ``sgtm bench --profile``)

One process (TP=1): build the engine, take warm-up steps, then profile ``steps`` steps of each
strategy (the strategy is switched on the same engine, same batches). Prints a Markdown block:
the top operators by self CPU time for both, side by side (per step), and the masking
functions' own share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.backend.distributed import free_port


def _profile(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import load_config
    from pipeline.engine.engine import build_engine, train_step

    cfg = load_config(None, [], data=spec["config"])
    state = build_engine(cfg)
    batches = torch.load(spec["batches"])
    for strategy in ("none", "sgtm"):  # warm-up both paths
        state.model.strategy = strategy
        for b in batches[:2]:
            float(train_step(state, [b]))
    out = {}
    for strategy in ("none", "sgtm"):
        state.model.strategy = strategy
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(spec["steps"]):
                float(train_step(state, [batches[i % len(batches)]]))
        rows = {}
        for e in prof.key_averages():
            rows[e.key] = {"self_ms": e.self_cpu_time_total / 1e3 / spec["steps"],
                           "total_ms": e.cpu_time_total / 1e3 / spec["steps"], "calls": e.count / spec["steps"]}
        out[strategy] = {"rows": rows, "table": prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                          row_limit=int(spec.get("rows", 25)))}
    return out


def profile_markdown(size: str, micro_batch: int, seq_len: int, steps: int, data: str, command: str,
                     log=print, top: int = 22) -> str:
    from pipeline.bench import train_bench

    with tempfile.TemporaryDirectory() as tmp:
        if data == "bilingual":
            batches = train_bench.bilingual_batches(steps + 2, micro_batch, seq_len, tmp)
        else:
            batches = train_bench.synthetic_batches(steps + 2, micro_batch, seq_len, 4096)
        import torch

        torch.save(batches, Path(tmp) / "batches.pt")
        spec = {"config": train_bench.experiment(size, "sgtm", 1, micro_batch, seq_len,
                                                 model=train_bench.model_section(size)),
                "batches": str(Path(tmp) / "batches.pt"), "steps": steps, "out": str(Path(tmp) / "profile.json")}
        env = train_bench._env(1, os.cpu_count())
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
        log(f"profiling {size}, {steps} steps of none and sgtm ...")
        subprocess.run([sys.executable, "-m", "pipeline.bench.profile", json.dumps(spec)], env=env,
                       cwd=train_bench.ROOT, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(Path(spec["out"]).read_text())
    none, sgtm = result["none"]["rows"], result["sgtm"]["rows"]
    total = {k: sum(r["self_ms"] for r in v.values()) for k, v in (("none", none), ("sgtm", sgtm))}
    keys = sorted(set(none) | set(sgtm), key=lambda k: -max(none.get(k, {}).get("self_ms", 0),
                                                           sgtm.get(k, {}).get("self_ms", 0)))[:top]
    lines = [f"### {train_bench._dt.datetime.now():%Y-%m-%d %H:%M}: `{command}`", "",
             f"Machine: {train_bench.machine()}; load average {train_bench.load_average()}. {size}, TP=1, batch "
             f"{micro_batch} x {seq_len} ({data}), {steps} profiled steps per strategy on one engine after "
             f"warm-up; torch.profiler CPU self time per step (ms) and calls per step, sorted by the larger "
             f"of the two. Self-time totals: none {total['none']:.0f} ms, sgtm {total['sgtm']:.0f} ms per step "
             f"(profiler overhead included; on a shared machine absolute times drift, compare calls and "
             f"shares).", "",
             "| operator | none ms | sgtm ms | none calls | sgtm calls |", "| --- | --- | --- | --- | --- |"]
    for k in keys:
        a, b = none.get(k, {}), sgtm.get(k, {})
        lines.append(f"| `{k}` | {a.get('self_ms', 0):.1f} | {b.get('self_ms', 0):.1f} | {a.get('calls', 0):.0f} | "
                     f"{b.get('calls', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    spec = json.loads(sys.argv[1])
    out = _profile(spec)
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
