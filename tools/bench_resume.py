"""Loader restore time at batch N and at batch 100 N, before (replay) and after (positions).

    .venv/bin/python tools/bench_resume.py [--steps 20] [--factor 100] [--also 20000] [--baseline-up-to 2000]
                                           [--json docs/bench/resume.json] [--doc docs/benchmarks.md]

Data: the bundled bilingual TinyStories (BPE 4096, both sources, shuffle buffer 2048 documents,
in the training process: num_workers 0), micro batches of 16 x 256 tokens. For each N a loader
delivers N batches, its state goes through JSON as a checkpoint keeps it, and a fresh loader
restores it: *restore* is the time from `load_state_dict` to the first batch it returns (process
CPU time and wall time), *documents read* what it read from the shards on the way. `--also`
adds restore points (e.g. one 1000x, to show where the cost levels off), `--baseline-up-to`
spares the replaying loader the points past it (its restore there is as long as the run). "before" is the
loader of git revision --baseline (it replays the stream and discards what was delivered),
imported from `git show`; "after" is the working tree's. `--doc` replaces the "## Loader resume"
section of the file with a table rendered from the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Loader resume"
BASELINE = "d1fdc60"  # the last commit whose loader replayed the stream on restore


def load_baseline(rev: str, workdir: Path):
    """The loader module as it was at ``rev`` (imported under another name, beside the current one)."""
    source = subprocess.run(["git", "show", f"{rev}:pipeline/data/loader.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = workdir / f"loader_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"baseline_loader_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def count_reads(module) -> list[int]:
    """Count the documents ``module``'s loader reads from shards, in order and (the current
    loader's restore) by seeking; a one-element list, reset by hand."""
    counter = [0]
    in_order = module.iter_shard_documents

    def counted(path, entry=None):
        for doc in in_order(path, entry):
            counter[0] += 1
            yield doc

    module.iter_shard_documents = counted
    by_seek = getattr(module, "read_documents", None)
    if by_seek is not None:
        def counted_seek(path, entry, indices):
            docs = by_seek(path, entry, indices)
            counter[0] += len(docs)
            return docs

        module.read_documents = counted_seek
    return counter


def measure(module, cfg: dict, steps: int, mbs: int, seq_len: int) -> dict:
    reads = count_reads(module)
    loader = module.build_loader(cfg, micro_batch_size=mbs, seq_len=seq_len)
    for _ in range(steps):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    resumed = module.build_loader(cfg, micro_batch_size=mbs, seq_len=seq_len)
    reads[0] = 0
    wall, cpu = time.perf_counter(), time.process_time()
    resumed.load_state_dict(state)
    next(resumed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    resumed.close()
    return {"step": steps, "restore_cpu_s": round(cpu, 3), "restore_wall_s": round(wall, 3), "docs_read": reads[0],
            "state_bytes": len(json.dumps(state))}


def render(result: dict) -> str:
    """The Markdown table of one run (what --doc writes)."""
    rows = [f"`{result['command']}` ({result['date']}; {result['machine']}; load average "
            f"{result['load_average']:.1f} at the start). Bundled bilingual TinyStories, BPE 4096, "
            f"{result['micro_batch_size']} x {result['seq_len']} tokens per batch, shuffle buffer "
            f"{result['shuffle_buffer']} documents, num_workers 0. Restore = `load_state_dict` + the first "
            f"batch after it; the uninterrupted stream delivers the same batches.",
            "",
            "| loader | restore at batch | CPU time | wall time | documents read | state (JSON bytes) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        rows.append(f"| {row['loader']} | {row['step']:,} | {row['restore_cpu_s']:.3f} s | "
                    f"{row['restore_wall_s']:.3f} s | {row['docs_read']:,} | {row['state_bytes']:,} |")
    for loader in ("before", "after"):
        mine = [r for r in result["rows"] if r["loader"].startswith(loader)]
        for later in mine[1:]:
            rows.append("")
            rows.append(f"{loader}: restore CPU time at batch {later['step']:,} / at batch {mine[0]['step']:,} = "
                        f"{later['restore_cpu_s'] / max(mine[0]['restore_cpu_s'], 1e-9):.2f}")
    rows += ["", ('Before, a restore replayed the stream: it read every document delivered so far and discarded it, so '
              "its cost grows with the position. After, it reads what the state names: the shuffle buffer's "
              "documents (by seeking: tar headers and the samples' metadata of each shard they are in, then only "
              "their samples) and one shard per source, up to the cursor. Its cost levels off once the buffer's "
              'documents come from all over the corpus (here, a small corpus, from every shard, the buffer holding '
              'a large share of it; a restore at the first batches finds them in the first few shards) and does not'
              " grow with the position after that. The state (per rank, in its `rank*.json`) is the buffer's "
              'document references and the cursors.')]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="N: the first restore point (batches)")
    parser.add_argument("--factor", type=int, default=100, help="the second restore point is factor x N")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--also", type=int, nargs="*", default=[], help="more restore points (batches)")
    parser.add_argument("--baseline-up-to", type=int, default=None, help="no 'before' rows past this batch")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the 'before' loader ('' to skip)")
    parser.add_argument("--json", metavar="FILE", help="write the result here")
    parser.add_argument("--doc", metavar="FILE", help="replace FILE's '## Loader resume' section with the table")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: render this result file (into --doc)")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        if args.doc:
            from pipeline.bench import train_bench

            train_bench.replace_section(Path(args.doc), HEADING, render(result))
        print(render(result))
        return result
    from pipeline.config import DataConfig
    from pipeline.data import loader as current
    from pipeline.data.prepare import prepare_bilingual

    load = os.getloadavg()[0]
    command = "python tools/bench_resume.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**prepare_bilingual(tmp, seq_len=args.seq_len), "num_workers": 0}
        buffer = DataConfig.from_dict(cfg).shuffle_buffer
        variants = [("after", current)]
        if args.baseline:
            variants.insert(0, (f"before ({args.baseline}, replay)", load_baseline(args.baseline, Path(tmp))))
        rows = []
        points = sorted({args.steps, args.steps * args.factor, *args.also})
        for name, module in variants:
            for steps in points:
                if module is not current and args.baseline_up_to is not None and steps > args.baseline_up_to:
                    continue
                row = {"loader": name, **measure(module, cfg, steps, args.micro_batch_size, args.seq_len)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"command": command, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
              "load_average": load, "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
              "shuffle_buffer": buffer, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.doc:
        from pipeline.bench import train_bench

        train_bench.replace_section(Path(args.doc), HEADING, render(result))
    print(render(result))
    return result


if __name__ == "__main__":
    main()
