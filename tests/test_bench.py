"""Smoke test of `sgtm bench` on a micro model: it runs end to end (speed processes, memory
processes, the reference harness) and writes the figures. Not a timed test: no speed is asserted."""

from __future__ import annotations

import json

from pipeline.bench.train_bench import add_to_section
from pipeline.cli import main


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data loader\nloader table\n\n## Training throughput\nintro\n\n## GPU\ngpu\n")
    rc = main(["bench", "--sizes", "micro", "--tp", "1", "--strategies", "none", "sgtm", "--rounds", "2",
               "--warmup", "0", "--mem-steps", "1", "--micro-batch", "2", "--seq-len", "32",
               "--data", "synthetic", "--json", str(out), "--doc", str(doc)])
    assert rc == 0
    result = json.loads(out.read_text())
    for key in ("sgtm_vs_none_tokens_per_s", "sgtm_vs_none_peak_mem", "pipeline_vs_reference_tokens_per_s",
                "rows", "ratios", "machine", "date", "command"):
        assert key in result, key
    assert result["sgtm_vs_none_tokens_per_s"] > 0 and result["sgtm_vs_none_peak_mem"] > 0
    impls = {(r["impl"], r["strategy"]) for r in result["rows"]}
    assert impls == {("pipeline", "none"), ("pipeline", "sgtm"), ("reference", "none"), ("reference", "sgtm")}
    assert all(r["peak_rss_mib"] > 0 for r in result["rows"])
    text = doc.read_text()
    # the table lands at the end of its own section; the other sections are untouched
    assert text.index("## Training throughput") < text.index("| micro") < text.index("## GPU")
    assert "## Data loader\nloader table\n" in text and text.endswith("## GPU\ngpu\n")


def test_add_to_section_creates_missing_section(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## Data loader\nx\n")
    add_to_section(doc, "## Profile", "table\n")
    assert doc.read_text() == "# Benchmarks\n\n## Data loader\nx\n\n## Profile\n\ntable\n"


def test_mixed_span_batches_change_mode_inside_documents():
    from pipeline.bench.train_bench import synthetic_batches

    for mixed, expect in ((False, False), (True, True)):
        b = synthetic_batches(2, 4, 256, 512, mixed_spans=mixed)[0]
        inside = (b["doc_ids"][:, 1:] == b["doc_ids"][:, :-1]) & (b["modes"][:, 1:] != b["modes"][:, :-1])
        assert bool(inside.any()) == expect


def test_bench_measures_both_cross_mode_attentions_on_mixed_spans(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--sizes", "micro", "--tp", "1", "--strategies", "none", "sgtm", "sgtm+detached_context",
               "--rounds", "2", "--warmup", "0", "--micro-batch", "2", "--seq-len", "64", "--data", "mixed-spans",
               "--no-reference", "--no-memory", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["strategy"] for r in rows} == {"none", "sgtm", "sgtm+detached_context"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
