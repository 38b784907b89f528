"""`make demo` stays short: with ``eval.calibrate_at: final`` only the last evaluation fits the
logit calibration (the demo's table reads it), the intermediate ones report full and ablated loss,
and the demo's table and curves still render from such a history."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "experiments" / "bilingual_tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from pipeline.data.prepare import prepare_bilingual

    out = tmp_path_factory.mktemp("data")
    prepare_bilingual(out, vocab_size=1024)
    return out


def _overrides(data_dir: Path, run_dir: Path, **extra: str) -> list[str]:
    o = {
        "model.n_layers": 1, "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128, "model.max_seq_len": 32,
        "model.vocab_size": 1024, "sgtm.domains": "[{name: spanish, heads: [1], units: 32}]",
        "engine.micro_batch_size": 4, "train.steps": 8, "train.log_every": 4, "optimizer.warmup_steps": 2,
        "eval.every": 4, "eval.batches": 1, "eval.batch_size": 4,
        "eval.calibration": "{steps: 5, batches: 1, tokens_per_step: 64}", "checkpoint.every": 0,
        "run_dir": str(run_dir), "data.num_workers": 0, "data.tokenizer": str(data_dir / "bpe1024.json"),
        "data.sources": f"[{{path: {data_dir}/en, true_label: retain}}, "
                        f"{{path: {data_dir}/es, true_label: 'forget:spanish'}}]",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def test_calibrate_at_is_a_validated_key_and_the_demo_calibrates_only_at_the_end():
    from pipeline.config import ConfigError, load_config
    from pipeline.train.loop import calibrates

    with pytest.raises(ConfigError, match=r"eval\.calibrate_at: expected one of \['every', 'final'\]"):
        load_config(CONFIG, ["eval.calibrate_at=sometimes"])
    with pytest.raises(ConfigError, match=r"eval\.calibrate_at: 'final' has no effect with eval\.calibrate=false"):
        load_config(CONFIG, ["eval.calibrate=false", "eval.calibrate_at=final"])
    assert load_config(CONFIG).eval.calibrate_at == "every"  # other configs keep calibrating every evaluation
    demo = yaml.safe_load((ROOT / "configs" / "experiments" / "demo.yaml").read_text())
    assert demo["eval"]["calibrate_at"] == "final" and demo["eval"]["every"] > 0
    final = load_config(CONFIG, ["eval.calibrate_at=final"])
    assert not calibrates(final, final=False) and calibrates(final, final=True)
    every = load_config(CONFIG)
    assert calibrates(every, final=False) and calibrates(every, final=True)
    off = load_config(CONFIG, ["eval.calibrate=false"])
    assert not calibrates(off, final=False) and not calibrates(off, final=True)


def test_final_only_calibration_leaves_the_demo_table_and_curves_whole(data_dir, tmp_path, capfd):
    """A run with calibrate_at=final: the step-4 evaluation has no calibrated loss and logs no
    calibration, the final (step 8) one and final.json have it; the demo's table shows every column
    as a number and its plot draws from that history."""
    from pipeline.config import load_config
    from pipeline.demo import eval_history, plot, table
    from pipeline.train.loop import train

    run_dir = tmp_path / "run"
    final = train(load_config(CONFIG, _overrides(data_dir, run_dir, **{"eval.calibrate_at": "final"})))
    hist = eval_history(run_dir)
    assert [r["step"] for r in hist] == [4, 8]
    assert not any(k.endswith("_calibrated") for k in hist[0]) and "retain_ablated" in hist[0]
    assert {"forget_calibrated", "retain_calibrated"} <= set(hist[1])
    last = {k: v for k, v in hist[1].items() if k != "time"}
    assert json.loads((run_dir / "final.json").read_text()) == final == last
    calibrating = [line for line in capfd.readouterr().err.splitlines() if "calibrating on" in line]
    assert len(calibrating) == 1 and "eval step 8:" in calibrating[0]  # the progress notes: one calibration
    text = table({"sgtm": final, "no_filter": final})
    cells = [c.strip() for row in text.splitlines()[2:] for c in row.strip("|").split("|")[1:]]
    assert len(cells) == 12 and all(math.isfinite(float(c)) for c in cells)
    plot({"sgtm": hist, "no_filter": hist}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
