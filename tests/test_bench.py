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
