"""Experiments: the analysis math on inputs with known answers, the sweep grid / SLURM emission,
and a tiny end-to-end sweep of 2 cells through analyses, attack, RMU and the report."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.experiments.stats import (
    compute_for_loss,
    compute_penalty,
    dose_equivalent,
    fit_power_law,
    nonincreasing,
    steps_to_threshold,
)
from tests.conftest import ROOT

# ------------------------------------------------------------------------------------ math


def test_dose_equivalent_interpolates_in_log_n_and_reports_bounds():
    doses = [0, 1e3, 1e4, 1e5]
    losses = [6.0, 5.0, 4.0, 3.0]  # 5 - log10(N/1e3) for N > 0, 6 at N = 0
    # exactly linear in log N between positive doses: a loss half-way in log space -> geometric mean
    assert dose_equivalent(doses, losses, 4.5)["n"] == pytest.approx(math.sqrt(1e3 * 1e4))
    assert dose_equivalent(doses, losses, 5.0 - math.log10(3))["n"] == pytest.approx(3e3)
    # between N = 0 and the smallest dose: linear in N
    assert dose_equivalent(doses, losses, 5.5)["n"] == pytest.approx(500.0)
    # more forgetting than the N = 0 run: N = 0 (below); less than the largest dose: a lower bound (above)
    assert dose_equivalent(doses, losses, 6.5) == {"n": 0.0, "bound": "below"}
    assert dose_equivalent(doses, losses, 2.0) == {"n": 1e5, "bound": "above"}
    # order of inputs does not matter
    assert dose_equivalent(doses[::-1], losses[::-1], 4.5)["n"] == pytest.approx(math.sqrt(1e7))


def test_nonincreasing_pools_violations():
    y = nonincreasing([5.0, 4.0, 4.4, 3.0])
    assert np.all(np.diff(y) <= 0)
    assert y.tolist() == pytest.approx([5.0, 4.2, 4.2, 3.0])
    assert nonincreasing([3.0, 2.0, 1.0]).tolist() == [3.0, 2.0, 1.0]
    # a noisy dose-response still gives a unique answer
    assert dose_equivalent([0, 10, 100], [5.0, 5.2, 4.0], 4.8)["n"] > 10


def test_power_law_fit_and_compute_penalty_known_answers():
    c = np.geomspace(1e12, 1e16, 5)
    fit = fit_power_law(c, 3.0 * c ** -0.05)
    assert fit["a"] == pytest.approx(3.0, rel=1e-9) and fit["b"] == pytest.approx(0.05, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    # a run at compute C whose loss equals a plain run's at C/2 gave up half its compute
    loss_half = 3.0 * (1e14 / 2) ** -0.05
    assert compute_for_loss(3.0, 0.05, loss_half) == pytest.approx(5e13, rel=1e-9)
    assert compute_penalty(3.0, 0.05, loss_half, 1e14) == pytest.approx(0.5)
    # better than a plain run at the same compute: negative penalty (paper: filters -10% / -15%)
    assert compute_penalty(3.0, 0.05, 3.0 * (1.1e14) ** -0.05, 1e14) == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        fit_power_law([1e12, 1e12], [3.0, 2.9])


def test_steps_to_threshold():
    steps, losses = [0, 10, 20, 30], [5.0, 4.0, 3.0, 2.0]
    assert steps_to_threshold(steps, losses, 3.5) == {"step": 20, "interpolated": 15.0}
    assert steps_to_threshold(steps, losses, 3.0) == {"step": 20, "interpolated": 20.0}
    assert steps_to_threshold(steps, losses, 6.0) == {"step": 0, "interpolated": 0.0}
    assert steps_to_threshold(steps, losses, 1.0) == {"step": None, "interpolated": None}


# ----------------------------------------------------------------------------------- sweep grid


def test_sweep_grid_expansion_exclusion_and_override_words():
    from pipeline.experiments.sweep import expand, normalize_override

    spec = {"grid": {"method": {"a": ["sgtm.strategy=sgtm"], "b": ["sgtm.strategy=none", "data.filter=weak"]},
                     "data.tagging.undiscovered_rate": [0.0, 0.2], "train.seed": [0, 1]},
            "overrides": ["sgtm.domains=[{name: spanish, heads: 1, units: 32}]"],
            "exclude": [{"method": "b", "train.seed": 1}]}
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 2 - 2
    assert {c.labels["method"] for c in cells} == {"a", "b"}
    for c in cells:
        assert all(not any(ch.isspace() for ch in o) for o in c.overrides)
        assert c.overrides[0] == 'sgtm.domains=[{"name":"spanish","heads":1,"units":32}]'
        k, v = c.overrides[0].split("=", 1)
        assert yaml.safe_load(v) == [{"name": "spanish", "heads": 1, "units": 32}]
    assert normalize_override("data.tagging.undiscovered_rate=0.05") == "data.tagging.undiscovered_rate=0.05"
    assert normalize_override("run_dir=/a/b") == "run_dir=/a/b"
    assert normalize_override("x=yes") == "x=true"  # YAML 1.1 booleans stay booleans


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A 2-cell sweep (SGTM vs weak filter) of a tiny model, run through `sgtm sweep`."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = {
        "name": "tiny", "base": "experiments/bilingual_tiny.yaml",
        "data": {"prepare": "bilingual", "vocab_size": 1024},
        "overrides": ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=256",
                      "model.max_seq_len=64", "model.vocab_size=1024",
                      "sgtm.domains=[{name: spanish, heads: [1], units: 32}]", "engine.micro_batch_size=4",
                      "train.steps=10", "train.log_every=5", "optimizer.warmup_steps=2", "eval.every=5",
                      "eval.batches=1", "eval.batch_size=4",
                      "eval.calibration={steps: 10, batches: 1, tokens_per_step: 128}",
                      "checkpoint.every=0", "checkpoint.keep=1"],
        "grid": {"method": {"sgtm": ["sgtm.strategy=sgtm", "data.filter=none"],
                            "weak_filter": ["sgtm.strategy=none", "data.filter=weak"]},
                 "data.tagging.undiscovered_rate": [0.2]},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp / "out"
    cmd = [sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return path, out, r.stdout


def test_tiny_sweep_records_cells_skips_finished_and_emits_slurm(tiny_sweep):
    path, out, first = tiny_sweep
    res = json.loads((out / "tiny" / "results.json").read_text())
    assert len(res["cells"]) == 2 and all(c["done"] for c in res["cells"])
    for c in res["cells"]:
        assert c["final"]["forget_full"] > 0 and [h["step"] for h in c["history"]] == [5, 10]
        assert "pipeline train --config" in c["command"]
    assert {c["labels"]["method"] for c in res["cells"]} == {"sgtm", "weak_filter"}
    # second run: nothing to train
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("skip finished") == 2 and "rc=" not in r.stdout
    # scripts name a cell by its labels; an ambiguous selector is a one-line error
    for c in res["cells"]:
        r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out),
                            "--cell", f"method={c['labels']['method']}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == c["run_dir"], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out),
                        "--cell", "data.tagging.undiscovered_rate=0.2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    err = [line for line in r.stderr.splitlines() if line.startswith("sgtm: error:")]
    assert r.returncode == 2 and len(err) == 1 and "found 2" in err[0], r.stderr[-2000:]
    # SLURM: a finished sweep has nothing pending; with one cell's final.json gone, one line
    from pipeline.experiments.sweep import run_sweep

    victim = res["cells"][0]["run_dir"]
    final = (out / "cells" / res["cells"][0]["key"] / "final.json")
    saved = final.read_text()
    final.unlink()
    try:
        run_sweep(path, out, slurm=True, log=lambda m: None)
        lines = (out / "tiny" / "cells.txt").read_text().splitlines()
        assert len(lines) == 1 and lines[0].endswith(f"run_dir={victim}")
        # both our script (bash eval) and launch/slurm/sweep.sbatch (shlex) get the overrides back
        words = res["cells"][0]["overrides"] + [f"run_dir={victim}"]
        assert shlex.split(lines[0]) == words
        echo = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\n" "$@"', "_", lines[0]],
                              capture_output=True, text=True)
        assert echo.stdout.splitlines() == words
        script = (out / "tiny" / "sweep.sbatch").read_text()
        assert 'sed -n "${SLURM_ARRAY_TASK_ID}p"' in script and "pipeline train --config" in script
        assert subprocess.run(["bash", "-n", str(out / "tiny" / "sweep.sbatch")]).returncode == 0
        # a second sweep process leaves alone the cell that another one is training
        import fcntl

        with open(Path(victim) / ".sweep.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            logged: list[str] = []
            res2 = run_sweep(path, out, log=logged.append)
        assert res2["failed"] == [] and not final.exists(), logged
        assert any("another sweep process is training it" in m for m in logged), logged
    finally:
        final.write_text(saved)


def test_tiny_sweep_analyses_attack_rmu_gradnorm_and_report(tiny_sweep, single_process_world):
    from pipeline.experiments import analyses, finetune
    from pipeline.experiments.report import build_report

    _, out, _ = tiny_sweep
    sweep_dir = out / "tiny"
    res = json.loads((sweep_dir / "results.json").read_text())
    cells = {c["labels"]["method"]: c for c in res["cells"]}
    a_dir = out / "analysis"
    t = analyses.tradeoff([sweep_dir], a_dir, "sgtm analyze tradeoff ...")
    assert {r["method"] for r in t["table"]} == {"sgtm", "weak_filter"}
    assert any("weak filter" in c["claim"] for c in t["claims"])
    assert (a_dir / "tradeoff.png").stat().st_size > 1000
    u = analyses.undiscovered([sweep_dir], a_dir, "sgtm analyze undiscovered ...")
    assert len(u["table"]) == 2
    p = analyses.per_token(cells["sgtm"]["run_dir"], a_dir, "sgtm analyze per-token ...")
    assert p["results"]["tokens"] > 0 and (a_dir / "per_token.png").is_file()
    tok = analyses.count_tokens(cells["sgtm"]["run_dir"])
    assert 0 < tok["total"] <= 10 * 4 * 64
    # SGTM: a forget token is forget-labelled or undiscovered (never retain mode)
    assert tok["forget_total"] > 0 and tok["forget_labelled"] + tok["forget_unlabelled"] == tok["forget_total"]
    # weak filter: every forget token it trained on is an undiscovered one
    tw = analyses.count_tokens(cells["weak_filter"]["run_dir"])
    assert tw["forget_labelled"] == 0 and tw["forget_total"] == tw["forget_unlabelled"]
    assert json.loads((Path(cells["sgtm"]["run_dir"]) / "tokens.json").read_text()) == tok  # cached

    ref = cells["weak_filter"]["run_dir"]
    atk = finetune.attack(cells["sgtm"]["run_dir"], a_dir, "sgtm attack ...", steps=4, eval_every=2, batch_size=4,
                          eval_batches=1, reference=ref)
    assert atk["ablated"] and [h["step"] for h in atk["history"]] == [0, 2, 4]
    assert atk["threshold"] == json.loads((Path(ref) / "final.json").read_text())["forget_full"]
    both = analyses.attacks([a_dir], a_dir, "sgtm analyze attacks ...", thresholds=[100.0])
    assert both["table"][0]["steps_to_100.000"] == 0  # any loss is below 100 at step 0
    g = finetune.gradnorm(cells["sgtm"]["run_dir"], a_dir, "sgtm analyze gradnorm ...", examples=4)
    assert all(r["n"] > 0 for r in g["table"])
    rm = finetune.rmu(cells["weak_filter"]["run_dir"], a_dir, "sgtm rmu ...", steps=3, batch_size=2, layer=1)
    assert (Path(rm["model_dir"]) / "model.safetensors").is_file() and rm["updated_blocks"] == [0, 1]

    report = build_report([a_dir], out / "report", intro=None, command="sgtm report --runs X --out Y")
    text = report.read_text()
    assert "sgtm analyze tradeoff" in text and "figures/analysis_tradeoff.png" in text
    assert (out / "report" / "figures" / "analysis_tradeoff.png").is_file()
    assert "Paper claims at a glance" in text



def test_verdicts_respect_the_noise_margin():
    from pipeline.experiments.analyses import beats, dominates

    assert beats(8.3, 5.5, noise=0.1) is True and beats(5.5, 8.3, noise=0.1) is False
    assert beats(5.93, 5.86, noise=0.1) == "within noise"
    # clearly better on forget, retain within noise: dominates; worse on one axis: does not
    assert dominates(beats(8.3, 6.0, 0.1), beats(4.83, 4.85, 0.1)) is True
    assert dominates(beats(8.3, 6.0, 0.1), beats(4.5, 4.85, 0.1)) is False
    assert dominates(beats(5.93, 5.90, 0.1), beats(5.67, 5.67, 0.1)) == "within noise"


def test_seeds_analysis_reports_spread_per_method(tmp_path):
    """Synthetic cells with known losses: the spread and the noise-margin verdict follow them."""
    from pipeline.experiments.analyses import NOISE_NATS, seeds

    cells = []
    for i, (method, seed, forget, retain) in enumerate([("no_filter", 0, 5.0, 4.6), ("no_filter", 1, 5.1, 4.7),
                                                         ("no_filter", 2, 5.05, 4.65)]):
        run = tmp_path / f"cell{i}"
        run.mkdir()
        (run / "final.json").write_text(json.dumps({"kind": "eval", "step": 1, "forget_full": forget,
                                                    "retain_full": retain}))
        cells.append({"key": f"k{i}", "labels": {"method": method}, "run_dir": str(run), "seed": seed,
                      "strategy": "none", "filter": "none"})
    (tmp_path / "results.json").write_text(json.dumps({"sweep": "seeds", "cells": cells}))
    res = seeds([str(tmp_path)], str(tmp_path / "out"), "test")
    (row,) = res["table"]
    assert row["seeds"] == [0, 1, 2]
    assert row["forget_spread"] == pytest.approx(0.1) and row["retain_spread"] == pytest.approx(0.1)
    assert row["forget_mean"] == pytest.approx(5.05)
    assert res["claims"][0]["holds"] is (0.1 <= NOISE_NATS)
