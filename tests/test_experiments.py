"""Experiments: the analysis math on inputs with known answers, the sweep grid / SLURM emission,
and a tiny end-to-end sweep of 2 cells through analyses, attack, RMU and the report."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.experiments.stats import (
    all_of,
    compute_for_loss,
    compute_penalty,
    diff_interval,
    dose_equivalent,
    exponent_interval_from_r2,
    fit_power_law,
    nonincreasing,
    steps_to_threshold,
    t_interval,
    verdict,
)
from tests.conftest import ROOT
from tests.support.sweeps import synthetic_sweep

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


def test_power_law_fit_reports_the_exponent_interval_and_calls_flat_fits_flat():
    """The interval is the regression's (checked against scipy's slope standard error); a fit is
    flat, with a reason, when the interval contains 0, when 2 points leave no interval, when R^2
    is below the floor, or when the loss does not move at all (the case that overflowed)."""
    from scipy.stats import linregress
    from scipy.stats import t as student

    rng = np.random.default_rng(0)
    c = np.geomspace(1e12, 1e16, 9)
    y = 3.0 * c ** -0.05 * np.exp(rng.normal(0, 0.01, c.size))
    fit = fit_power_law(c, y)
    ref = linregress(np.log(c), np.log(y))
    half = student.ppf(0.975, c.size - 2) * ref.stderr
    assert fit["b"] == pytest.approx(-ref.slope) and fit["b_se"] == pytest.approx(ref.stderr)
    assert (fit["b_lo"], fit["b_hi"]) == pytest.approx((-ref.slope - half, -ref.slope + half))
    assert fit["r2"] == pytest.approx(ref.rvalue ** 2) and not fit["flat"] and fit["reason"] is None
    # the report rebuilds the same interval from b, R^2 and n for summaries that predate it
    assert exponent_interval_from_r2(fit["b"], fit["r2"], 9) == pytest.approx((fit["b_lo"], fit["b_hi"]))

    two = fit_power_law([1e12, 1e13], [3.0, 2.9])
    assert two["flat"] and two["b_lo"] is None and "2 points" in two["reason"]
    noise = fit_power_law(c, 4.0 * np.exp(rng.normal(0, 0.01, c.size)))  # no trend at all
    assert noise["flat"] and noise["b_lo"] <= 0 <= noise["b_hi"] and "contains 0" in noise["reason"]
    # many points: a significant slope that explains little of the loss is still flat
    cm = np.geomspace(1e12, 1e16, 400)
    weak = fit_power_law(cm, 3.0 * cm ** -0.002 * np.exp(rng.normal(0, 0.02, cm.size)))
    assert weak["b_lo"] > 0 and weak["r2"] < 0.5 and weak["flat"] and "below the floor 0.5" in weak["reason"]
    # two sizes x three seeds at one loss (the sweep): no exponent, whatever its rounding
    same = fit_power_law([6.4e6, 2.56e7] * 3, [4.0] * 6)
    assert same["flat"] and same["r2"] is None and "same at every compute" in same["reason"]


def test_compute_for_loss_is_done_in_log_space_at_extreme_exponents():
    """The issue's numbers: a = 4, b = -3.3e-17 (a flat fit's rounding), loss 9. The old form
    (loss / a) ** (-1 / b) raises OverflowError; in log space C is inf (or 0 for the other sign of
    the rounding), the penalty -inf (or 1), never an exception; b == 0 has no answer (None)."""
    a, b, loss_ = 3.9999999999999956, -3.267959445834808e-17, 9.0
    with pytest.raises(OverflowError):
        (loss_ / a) ** (-1.0 / b)  # the old inversion
    assert compute_for_loss(a, b, loss_) == math.inf and compute_penalty(a, b, loss_, 1e7) == -math.inf
    assert compute_for_loss(a, -b, loss_) == 0.0 and compute_penalty(a, -b, loss_, 1e7) == 1.0
    assert compute_for_loss(a, 0.0, loss_) is None and compute_penalty(a, 0.0, loss_, 1e7) is None
    # a shallow but real fit far outside its range: C_equivalent = 10^2000 in the old form overflows
    with pytest.raises(OverflowError):
        (1.0 / 10.0) ** (-1.0 / 5e-4)
    assert compute_for_loss(10.0, 5e-4, 1.0) == math.inf
    assert compute_penalty(10.0, 5e-4, 1.0, 1e20) == -math.inf
    assert compute_penalty(10.0, 5e-4, 100.0, 1e20) == 1.0  # C_equivalent = 10^-2000: underflows to 0


@settings(max_examples=200, deadline=None)
@given(a=st.floats(0.1, 100.0), b=st.floats(1e-3, 2.0), sign=st.sampled_from([1.0, -1.0]),
       log10_c=st.floats(0.0, 20.0), penalty=st.floats(-10.0, 0.999))
def test_compute_for_loss_round_trips_the_power_law(a, b, sign, log10_c, penalty):
    """compute_for_loss inverts loss = a * C^-b for either sign of b, and compute_penalty of the
    loss a run at C reaches with (1 - p) C of plain compute is p."""
    b *= sign
    c = 10.0 ** log10_c
    assert compute_for_loss(a, b, a * c ** -b) == pytest.approx(c, rel=1e-9)
    assert compute_penalty(a, b, a * ((1 - penalty) * c) ** -b, c) == pytest.approx(penalty, rel=1e-9, abs=1e-9)


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
    """A 2-cell sweep (SGTM vs weak filter) of a tiny model, run through `sgtm sweep` (its cell
    store in the temp dir: `tmp/store`, never the committed docs/results/cells)."""
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
    cmd = [sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out),
           "--store", str(tmp / "store")]
    # a hang guard, not a speed check (400 s tripped once under load ~35)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
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
    store = ["--store", str(out.parent / "store")]
    r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out), *store],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("skip finished") == 2 and "rc=" not in r.stdout
    # every finished cell wrote its summary to the store, which stands in for the run dirs: with
    # them moved away nothing is pending, and the analysis loader reads the same cells from it
    from pipeline.experiments.cells import NUMERICS_VERSION, thin
    from pipeline.experiments.common import load_cells

    stored = sorted((out.parent / "store" / "tiny").glob("[!_]*.json"))
    assert [f.stem for f in stored] == ["data.tagging.undiscovered_rate=0.2__method=sgtm",
                                        "data.tagging.undiscovered_rate=0.2__method=weak_filter"]
    runs = {c["labels"]["method"]: c for c in load_cells([out / "tiny"])}
    os.rename(out / "cells", out / "cells.away")
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--config", str(path), "--out", str(out),
                            *store, "--pending"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr[-2000:]
        kept = {c["labels"]["method"]: c for c in load_cells([out.parent / "store" / "tiny"])}
    finally:
        os.rename(out / "cells.away", out / "cells")
    assert kept.keys() == runs.keys()
    for m, c in kept.items():
        assert c["numerics_version"] == NUMERICS_VERSION and c["run_dir"] is None
        assert c["final"] == runs[m]["final"] and c["history"] == thin(runs[m]["history"])
        assert c["deployed_eval"]["sets"] == runs[m]["deployed_eval"]["sets"]
        assert c["token_counts"]["total"] > 0 and c["n_params"] == runs[m]["n_params"]
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
        # the store still holds the cell: nothing is pending there
        run_sweep(path, out, slurm=True, log=lambda m: None, store=out.parent / "store")
        assert (out / "tiny" / "cells.txt").read_text() == ""
        run_sweep(path, out, slurm=True, log=lambda m: None, store=None)  # the run dirs alone
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
            res2 = run_sweep(path, out, log=logged.append, store=None)
        assert res2["failed"] == [] and not final.exists(), logged
        assert any("another sweep process is training it" in m for m in logged), logged
    finally:
        final.write_text(saved)


def test_tiny_sweep_analyses_attack_rmu_gradnorm_and_report(tiny_sweep, single_process_world):
    from pipeline.experiments import finetune
    from pipeline.experiments.analyses.attacks import attacks
    from pipeline.experiments.analyses.per_token import per_token
    from pipeline.experiments.analyses.tradeoff import tradeoff
    from pipeline.experiments.analyses.undiscovered import undiscovered
    from pipeline.experiments.counts import count_tokens
    from pipeline.experiments.report import build_report

    _, out, _ = tiny_sweep
    sweep_dir = out / "tiny"
    res = json.loads((sweep_dir / "results.json").read_text())
    cells = {c["labels"]["method"]: c for c in res["cells"]}
    a_dir = out / "analysis"
    t = tradeoff([sweep_dir], a_dir, "sgtm analyze tradeoff ...")
    assert {r["method"] for r in t["table"]} == {"sgtm", "weak_filter"}
    assert any("weak filter" in c["claim"] for c in t["claims"])
    assert (a_dir / "tradeoff.png").stat().st_size > 1000
    u = undiscovered([sweep_dir], a_dir, "sgtm analyze undiscovered ...")
    assert len(u["table"]) == 2
    p = per_token(cells["sgtm"]["run_dir"], a_dir, "sgtm analyze per-token ...")
    assert p["results"]["tokens"] > 0 and (a_dir / "per_token.png").is_file()
    tok = count_tokens(cells["sgtm"]["run_dir"])
    assert 0 < tok["total"] <= 10 * 4 * 64
    # SGTM: a forget token is forget-labelled or undiscovered (never retain mode)
    assert tok["forget_total"] > 0 and tok["forget_labelled"] + tok["forget_unlabelled"] == tok["forget_total"]
    # weak filter: every forget token it trained on is an undiscovered one
    tw = count_tokens(cells["weak_filter"]["run_dir"])
    assert tw["forget_labelled"] == 0 and tw["forget_total"] == tw["forget_unlabelled"]
    assert json.loads((Path(cells["sgtm"]["run_dir"]) / "tokens.json").read_text()) == tok  # cached

    # every finished cell got its whole-split deployed evaluation (both columns, every method)
    for c in cells.values():
        rec = json.loads((Path(c["run_dir"]) / "deployed.json").read_text())
        assert rec["deployed_model"] == ("ablated" if c["labels"]["method"] == "sgtm" else "full")
        assert rec["sets"]["forget"]["tokens"] > 64 and rec["sets"]["forget"]["deployed_calibrated"] > 0
    ref = cells["weak_filter"]["run_dir"]
    atk = finetune.attack(cells["sgtm"]["run_dir"], a_dir, "sgtm attack ...", steps=4, eval_every=2, batch_size=4,
                          eval_batches=1, reference=ref)
    assert atk["ablated"] and [h["step"] for h in atk["history"]] == [0, 2, 4]
    # target and evaluation share one set: the reference attacked by 0 steps starts exactly at its target
    own = finetune.attack(ref, a_dir, "sgtm attack ...", steps=1, eval_every=1, batch_size=4, eval_batches=1,
                          reference=ref, ablate="no", name="attack_self")
    assert own["forget_loss_start"] == pytest.approx(own["threshold"], abs=1e-6)
    both = attacks([a_dir], a_dir, "sgtm analyze attacks ...", thresholds=[100.0])
    assert all(r["steps_to_100"] == 0 for r in both["table"])  # any loss is below 100 at step 0
    g = finetune.gradnorm(cells["sgtm"]["run_dir"], a_dir, "sgtm analyze gradnorm ...", examples=4)
    assert all(r["n"] > 0 for r in g["table"])
    rm = finetune.rmu(cells["weak_filter"]["run_dir"], a_dir, "sgtm rmu ...", steps=3, batch_size=2, layer=1)
    assert (Path(rm["model_dir"]) / "model.safetensors").is_file() and rm["updated_blocks"] == [0, 1]

    report = build_report([a_dir], out / "report", intro=None, command="sgtm report --runs X --out Y")
    text = report.read_text()
    assert "sgtm analyze tradeoff" in text and "figures/analysis_tradeoff.png" in text
    assert (out / "report" / "figures" / "analysis_tradeoff.png").is_file()
    assert "Paper claims at a glance" in text


# ------------------------------------------------------------------------- intervals and verdicts


def test_t_interval_and_diff_interval_known_answers():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert iv["mean"] == pytest.approx(2.0) and iv["sd"] == pytest.approx(1.0)
    assert iv["hi"] - iv["mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert t_interval([5.0])["lo"] is None and t_interval([])["mean"] is None
    # paired: same seeds -> interval of the per-seed differences (here constant: zero width)
    d = diff_interval({0: 5.0, 1: 6.0, 2: 7.0}, {0: 4.0, 1: 5.0, 2: 6.0})
    assert d["paired"] and d["mean"] == pytest.approx(1.0) and d["lo"] == pytest.approx(1.0)
    assert verdict(d) == "holds"
    # unpaired (different seeds): Welch; the same values no longer give a zero-width interval
    w = diff_interval({0: 5.0, 1: 6.0, 2: 7.0}, {3: 4.0, 4: 5.0, 5: 6.0})
    assert not w["paired"] and w["lo"] < 0 < w["hi"] and verdict(w) == "inconclusive"
    # one seed: no interval, never a yes/no verdict
    assert verdict(diff_interval({0: 9.0}, {0: 1.0})) == "inconclusive"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=6), st.lists(st.floats(-3, 3), min_size=2, max_size=6),
       st.floats(-10, 10))
def test_verdict_is_antisymmetric_and_follows_a_shift(noise_a, noise_b, shift):
    n = min(len(noise_a), len(noise_b))
    a = {i: 5.0 + shift + noise_a[i] for i in range(n)}
    b = {i: 5.0 + noise_b[i] for i in range(n)}
    ab, ba = verdict(diff_interval(a, b)), verdict(diff_interval(b, a))
    flip = {"holds": "does not hold", "does not hold": "holds", "inconclusive": "inconclusive"}
    assert ba == flip[ab]
    if ab == "holds":  # the interval is above 0, so the mean difference is too
        assert np.mean(list(a.values())) > np.mean(list(b.values()))
    # a shift far beyond the spread of the values is detected (mutation: verdict ignoring lo/hi fails here)
    far = {i: v + 100.0 for i, v in b.items()}
    assert verdict(diff_interval(far, b)) == "holds" and verdict(diff_interval(b, far)) == "does not hold"


def test_all_of_needs_every_part():
    assert all_of("holds", "holds") == "holds"
    assert all_of("holds", "does not hold") == "does not hold"
    assert all_of("holds", "inconclusive") == "inconclusive"


def test_sweep_seeds_key_runs_every_cell_per_seed_with_seeded_init_data_and_labels(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.experiments.sweep import expand, load_sweep

    spec = {"grid": {"method": {"a": ["sgtm.strategy=sgtm"], "b": ["sgtm.strategy=none"]}}, "seeds": [0, 3]}
    cells = expand(spec)
    assert sorted((c.labels["method"], c.labels["seed"]) for c in cells) == [("a", 0), ("a", 3), ("b", 0), ("b", 3)]
    for c in cells:
        s = c.labels["seed"]
        assert f"train.seed={s}" in c.overrides and f"data.tagging.seed={s}" in c.overrides
    bad = tmp_path / "bad.yaml"
    for seeds in ([0, 0], [-1], "0,1", [1.5]):
        bad.write_text(yaml.safe_dump({"name": "x", "base": "b.yaml", "grid": {"a": [1]}, "seeds": seeds}))
        with pytest.raises(ConfigError, match="seeds: expected a list of distinct non-negative integers"):
            load_sweep(bad)


def test_pareto_claim_checks_both_axes(tmp_path):
    """SGTM clearly higher on forget but clearly worse on retain (the old report called this
    'holds'): dominance does not hold. Better on both: holds."""
    from pipeline.experiments.analyses.tradeoff import tradeoff

    def run(retain_sgtm):
        cells = []
        for seed, eps in enumerate([0.0, 0.01, -0.01]):
            cells.append(("sgtm", seed, {"forget": (8.3 + eps, 8.2), "retain": (retain_sgtm + eps, 4.8)}))
            cells.append(("gradient_routing", seed, {"forget": (6.0 + eps, 5.9), "retain": (4.829 + eps / 2, 4.8)}))
        sub = tmp_path / f"r{retain_sgtm}"
        sub.mkdir()
        res = tradeoff([str(synthetic_sweep(sub, cells))], str(sub / "out"), "test")
        (c,) = [c for c in res["claims"] if "Pareto" in c["claim"]]
        return c["holds"]

    assert run(4.853) == "does not hold"
    assert run(4.80) == "holds"


def test_headroom_claim_needs_the_perfect_filter_gap_above_seed_noise(tmp_path):
    """The Wikipedia diagnostic: a perfect (true-label) filter whose forget loss is clearly above no
    filter's gives a `holds` headroom row with the gap and its seed noise; a gap inside the seed
    noise (the 300-step Wikipedia arm) is `inconclusive`, and the summary keeps the numbers."""
    from pipeline.experiments.analyses.tradeoff import tradeoff
    from pipeline.experiments.common import summarize

    def run(gap):
        cells = []
        for seed, eps in enumerate([0.0, 0.03, -0.02]):
            cells.append(("no_filter", seed, {"forget": (5.0 + eps, 5.0 + eps), "retain": (4.6, 4.6)}))
            cells.append(("perfect_filter", seed, {"forget": (5.0 + gap + eps * (1 + 2 * seed), 5.0 + gap),
                                                    "retain": (4.6, 4.6)}))
        sub = tmp_path / f"g{gap}"
        sub.mkdir()
        res = tradeoff([str(synthetic_sweep(sub, cells))], str(sub / "out"), "test")
        (c,) = [c for c in res["claims"] if "removable gap" in c["claim"]]
        assert summarize(res)["headroom"] == res["headroom"]
        return c["holds"], res["headroom"]

    v, h = run(0.5)
    assert v == "holds" and h["gap"] == pytest.approx(0.5 + (0.03 * 2 - 0.02 * 4) / 3)
    assert h["seeds"] == 3 and h["gap_over_seed_sd"] > 5
    v, h = run(0.01)
    assert v == "inconclusive" and h["verdict"] == "inconclusive" and h["gap_over_seed_sd"] < 1


def test_attack_verdict_needs_something_removed(tmp_path):
    """RMU that left the model at the target (start - target ~ 0), or far closer to it than SGTM,
    cannot be 'resisted longer than'."""
    from pipeline.experiments.analyses.attacks import attacks

    def write(label, seed, start, target, losses):
        hist = [{"step": 10 * i, "forget_loss": v, "retain_loss": 4.0} for i, v in enumerate([start] + losses)]
        res = {"label": label, "strategy": "x", "model_seed": seed, "threshold": target,
               "forget_loss_start": start, "retain_loss_start": 4.0, "retain_loss_end": 4.0, "history": hist,
               "tokens_per_step": 1}
        (tmp_path / f"attack_{label}_s{seed}.analysis.json").write_text(
            json.dumps({"analysis": f"attack_{label}_s{seed}", "results": res}))

    for seed in range(3):
        write("sgtm", seed, 8.2 + 0.01 * seed, 5.0, [7.0, 6.0, 5.5, 5.2])  # never reaches 5.0 in 40 steps
        write("rmu", seed, 5.0 + 0.001 * (seed - 1), 5.0, [4.9, 4.8])  # RMU did nothing
    res = attacks([str(tmp_path)], str(tmp_path / "out"), "test")
    (c,) = res["claims"]
    assert c["holds"] == "inconclusive" and "RMU" in c["here"]
    # RMU measurably above the target but by a sliver (0.05 vs SGTM's 3.2 nats: the Wikipedia case)
    for seed in range(3):
        write("rmu", seed, 5.05 + 0.001 * seed, 5.0, [5.1, 4.9])
    (c,) = attacks([str(tmp_path)], str(tmp_path / "out1"), "test")["claims"]
    assert c["holds"] == "inconclusive" and "too far apart" in c["here"]
    # when RMU did raise the forget loss comparably and recovers fast, the comparison is made
    for seed in range(3):
        write("rmu", seed, 6.8 + 0.01 * seed, 5.0, [5.5, 4.9])
    res = attacks([str(tmp_path)], str(tmp_path / "out2"), "test")
    assert res["claims"][0]["holds"] == "holds"


def test_report_renders_template_fields_pending_sections_and_summaries(tmp_path):
    from pipeline.experiments.analyses.tradeoff import tradeoff
    from pipeline.experiments.report import build_report, load_summaries, render_template

    cells = [("sgtm", s, {"forget": (8.0 + 0.1 * s, 8.0), "retain": (4.8, 4.8)}) for s in range(3)]
    cells += [("weak_filter", s, {"forget": (5.5 + 0.1 * s, 5.5), "retain": (4.4, 4.4)}) for s in range(3)]
    a_dir = tmp_path / "analysis" / "bilingual"
    tradeoff([str(synthetic_sweep(tmp_path, cells))], str(a_dir), "sgtm analyze tradeoff")
    intro = tmp_path / "intro.md"
    intro.write_text("SGTM {{bilingual/tradeoff:table[method=sgtm].forget_cal|.3f}} over "
                     "{{bilingual/tradeoff:setup.seeds}} seeds; wiki {{wiki/tradeoff:table[method=sgtm].forget_cal}}.")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:begin -->\nold 1.234\n<!-- results:end -->\ntail\n")
    report = build_report([tmp_path / "analysis"], tmp_path / "docs", intro=str(intro), command="sgtm report",
                          readme=readme)
    text = report.read_text()
    assert "SGTM 8.100 over [0, 1, 2] seeds; wiki (pending)." in text
    assert "## Pending" in text and "`wiki/tradeoff`" in text
    summaries = load_summaries(tmp_path / "docs" / "results")
    assert set(summaries) == {"bilingual/tradeoff"} and "curves" not in summaries["bilingual/tradeoff"]
    assert "old 1.234" not in readme.read_text() and readme.read_text().endswith("tail\n")
    assert render_template("{{bilingual/tradeoff:setup.steps|pct}}", summaries) == "1000%"
    # every number in the generated report is in a summary (the check the committed report gets)
    assert numbers_not_in_summaries(text, summaries) == set()
    assert numbers_not_in_summaries(text + " 7.777", summaries) == {"7.777"}


NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")  # 1.43e-05 is one number


def _summary_numbers(obj, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _summary_numbers(k, out)
            _summary_numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _summary_numbers(v, out)
    elif isinstance(obj, str):
        out.update(m.lstrip("+") for m in NUMBER.findall(obj))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        from pipeline.experiments.common import fmt

        v = float(obj)
        forms = {fmt(obj), fmt(v, 4), str(obj), f"{v:g}", f"{v:.3g}", f"{v:.4g}"}
        for d in range(5):
            forms |= {f"{v:.{d}f}", f"{100 * v:.{d}f}"}
        out.update(f.lstrip("+") for f in forms)
    return out


def numbers_not_in_summaries(text: str, summaries: dict) -> set[str]:
    """Numbers in ``text`` (as written) that no summary holds (as a value in some rounding, or
    inside one of its strings)."""
    known = _summary_numbers(summaries, set())
    return {m.lstrip("+") for m in NUMBER.findall(text)} - known


def test_every_number_in_the_committed_results_appears_in_a_committed_summary():
    """docs/results.md and the README's results tables state only numbers that a committed summary
    under docs/results/ holds (the report renders them from there; nothing is typed by hand)."""
    from pipeline.experiments.report import README_BEGIN, README_END, load_summaries

    summaries = load_summaries(ROOT / "docs" / "results")  # may be empty: then no number may appear
    text = (ROOT / "docs" / "results.md").read_text()
    missing = numbers_not_in_summaries(text, summaries)
    assert not missing, f"docs/results.md: numbers in no summary under docs/results/: {sorted(missing)[:20]}"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    tables = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert README_BEGIN in section and README_END in section
    missing = numbers_not_in_summaries(tables, summaries)
    assert not missing, f"README Results tables: numbers in no summary under docs/results/: {sorted(missing)[:20]}"
    # the intro template types no figure itself: its digits sit inside {{...}} fields (or names in `code`)
    intro = (ROOT / "configs" / "sweeps" / "report_intro.md").read_text()
    prose = re.sub(r"`[^`]*`", "", re.sub(r"\{\{[^}]*\}\}", "", intro))
    assert not re.findall(r"\d", prose), "report_intro.md: a number typed by hand"


# ---------------------------------------------------------------------------------- calibration


def _markov_batches(n_batches: int, batch: int, seq: int, gen: torch.Generator, unigram: torch.Tensor,
                    follow: torch.Tensor) -> list[dict]:
    """Text from a known source: each token is, with probability 1/2, drawn from ``unigram``, else
    ``follow[previous token]``."""
    out = []
    for _ in range(n_batches):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.multinomial(unigram, batch, replacement=True, generator=gen)
        for t in range(1, seq + 1):
            uni = torch.multinomial(unigram, batch, replacement=True, generator=gen)
            x[:, t] = torch.where(torch.rand(batch, generator=gen) < 0.5, follow[x[:, t - 1]], uni)
        out.append({"input_ids": x[:, :-1], "labels": x[:, 1:].clone(), "doc_ids": torch.zeros(batch, seq,
                                                                                                dtype=torch.long)})
    return out


def test_calibration_does_not_raise_heldout_loss_and_lowers_it_when_miscalibrated(single_process_world, monkeypatch):
    """A small model trained to its data: calibration fitted on a small training sample (512 tokens
    against a 256-token vocabulary: easy to over-fit) keeps held-out loss; on text whose token
    frequencies differ from the training text it lowers held-out loss. Mutation: returning the
    last iterate instead of the validated one (the old procedure) raises held-out loss."""
    from pipeline.components import evaluation as ev
    from pipeline.config import CalibrationConfig
    from pipeline.engine.engine import build_model
    from tests.support.configs import tiny_config

    V, S = 256, 32
    cfg = tiny_config(strategy="none", two_domains=False, model={"vocab_size": V, "max_seq_len": S})
    torch.manual_seed(0)
    _, model = build_model(cfg, single_process_world)
    g = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, V + 1).float() ** 1.1
    zipf /= zipf.sum()
    follow = torch.randperm(V, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for b in _markov_batches(300, 32, S, torch.Generator().manual_seed(2), zipf, follow):
        opt.zero_grad()
        model(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"]).backward()
        opt.step()
    model.eval()

    def heldout_loss(batches, bias):
        with torch.no_grad():
            h = torch.cat([model(b["input_ids"], doc_ids=b["doc_ids"], return_hidden=True).reshape(-1, 32)
                           for b in batches])
        return ev._objective(model, [(1.0, h, torch.cat([b["labels"].reshape(-1) for b in batches]))], bias)

    zero = torch.zeros(V)
    cal = CalibrationConfig()  # the defaults
    for name, unigram in (("same text", zipf), ("shifted frequencies", zipf.roll(V // 2))):
        calib = {"retain": _markov_batches(4, 4, S, torch.Generator().manual_seed(3), unigram, follow)}
        held = _markov_batches(16, 64, S, torch.Generator().manual_seed(4), unigram, follow)
        with torch.enable_grad():
            bias = ev.fit_calibration_bias(model, calib, [], cal, "cpu")
        before, after = heldout_loss(held, zero), heldout_loss(held, bias)
        assert after <= before + 1e-6, (name, before, after)
        if name == "shifted frequencies":
            assert after < before - 0.05, (before, after)  # it does calibrate
        else:
            calls = iter(range(0, -10_000, -1))  # mutation: every check "improves" -> the last iterate
            monkeypatch.setattr(ev, "_objective", lambda *a, calls=calls, **k: float(next(calls)))
            with torch.enable_grad():
                last = ev.fit_calibration_bias(model, calib, [], cal, "cpu")
            monkeypatch.undo()
            assert heldout_loss(held, last) > before + 0.05


def test_seeds_analysis_reports_spread_per_method(tmp_path):
    """Synthetic cells with known losses: mean, spread and interval follow them."""
    from pipeline.experiments.analyses.seeds import seeds

    cells = [("no_filter", s, {"forget": (f, f), "retain": (r, r)})
             for s, f, r in [(0, 5.0, 4.6), (1, 5.1, 4.7), (2, 5.05, 4.65)]]
    res = seeds([str(synthetic_sweep(tmp_path, cells))], str(tmp_path / "out"), "test")
    (row,) = res["table"]
    assert row["seeds"] == [0, 1, 2] and row["forget_mean"] == pytest.approx(5.05)
    assert row["forget_spread"] == pytest.approx(0.1) and row["retain_spread"] == pytest.approx(0.1)
    assert row["forget_pm"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), rel=1e-4)


def test_leakage_compares_sizes_at_one_matched_rate_and_compute_penalty_runs(tmp_path):
    """Two sizes; the small one also has a 5% cell with a much larger leakage. The size claim
    uses the 20% cells only (the old report averaged every rate of a size into its point).

    The compute penalty runs on the same sweep with a real retain fit on purpose: no filter's
    retain loss is 4.0 at the small size and 3.7 at the big one, times exp(+-0.003) by seed, so
    the log-log fit passes through both exactly (b = ln(4/3.7) / ln 4) with an interval that
    excludes 0 (6 points). Its forget loss is 4.0 at both sizes: that fit is flat and says so.
    (Retain used to be 4.0 at both sizes too: b was +-3e-17 by rounding and the sign decided
    between a penalty of exactly 100% and an OverflowError.)"""
    from pipeline.experiments.analyses.compute_penalty import compute_penalty_analysis
    from pipeline.experiments.analyses.leakage import leakage

    cells = []
    for seed in range(3):
        for size, n_params, d in (("s", 1000, 8), ("b", 4000, 16)):
            f = {"n_params": n_params, "d_model": d}
            # dose-response: forget loss falls with N forget tokens seen (same curve for both sizes)
            for n_tok, loss_ in ((0, 9.0), (1000, 7.0), (10000, 5.0)):
                cells.append(("weak_filter", seed, {"forget": (loss_, loss_), "retain": (4.0, 4.0)},
                              {**f, "forget_unlabelled": n_tok, "undiscovered_rate": n_tok / 1e5}))
            # SGTM at 20%: saw 20000 undiscovered tokens; small model leaks more (lower forget loss)
            target = (7.0 if size == "s" else 8.0) + 0.01 * seed
            cells.append(("sgtm", seed, {"forget": (target, target), "retain": (4.2, 4.2)},
                          {**f, "forget_unlabelled": 20000, "undiscovered_rate": 0.2}))
            retain = (3.7 if d == 16 else 4.0) * math.exp(0.003 * (seed - 1))
            cells.append(("no_filter", seed, {"forget": (4.0, 4.0), "retain": (retain, retain)},
                          {**f, "undiscovered_rate": 0.2}))
        # a 5% cell at the big size only, leaking far more: it must not enter the size comparison
        cells.append(("sgtm", seed, {"forget": (5.0, 5.0), "retain": (4.2, 4.2)},
                      {"n_params": 4000, "d_model": 16, "forget_unlabelled": 5000, "undiscovered_rate": 0.05}))
    sweep = synthetic_sweep(tmp_path, cells)
    res = leakage([str(sweep)], str(tmp_path / "out"), "test")
    (size_claim,) = [c for c in res["claims"] if "model size" in c["claim"]]
    assert "at 20% undiscovered only" in size_claim["claim"] and size_claim["holds"] == "holds"
    rows = {(r["n_params"], r["undiscovered_rate"]): r for r in res["table"]}
    # small model at 20%: loss 7.0 -> N = 1000 -> leakage 1000 / 20000; big at 5%: N = 10000 / 5000 (above)
    assert rows[(1000, 0.2)]["leakage"] == pytest.approx(0.05, rel=0.05) and rows[(1000, 0.2)]["seeds"] == 3
    assert rows[(4000, 0.2)]["leakage"] < rows[(1000, 0.2)]["leakage"]
    cp = compute_penalty_analysis([str(sweep)], str(tmp_path / "out"), "test")
    fit = cp["fits"]["retain"]
    b = math.log(4.0 / 3.7) / math.log(4.0)
    assert fit["points"] == 6 and not fit["flat"] and fit["b"] == pytest.approx(b, rel=1e-9)
    assert 0 < fit["b_lo"] < b < fit["b_hi"] and all(c["holds"] is None for c in cp["claims"])
    rows = {(r["set"], r["method"], r["size"].split(" ")[0]): r for r in cp["table"]}
    # SGTM's retain 4.2 against the law: the small plain run reaches it at (4.2/4.0)^(-1/b) of its compute
    small, big = (rows[("retain", "sgtm", k)] for k in ("d8xL1", "d16xL1"))
    assert small["seeds"] == 3 and big["seeds"] == 6  # the big size also has the 5% cells (same retain loss)
    assert small["penalty"] == pytest.approx(1 - (4.2 / 4.0) ** (-1 / b), rel=1e-6)
    assert big["penalty"] == pytest.approx(1 - (4.2 / 3.7) ** (-1 / b), rel=1e-6)
    assert 0.5 < small["penalty"] < big["penalty"] < 1
    (retain_claim,) = [c for c in cp["claims"] if c["claim"].endswith("on retain for sgtm")]
    assert retain_claim["here"].endswith("% over 9 runs")
    assert cp["fits"]["forget"]["flat"] and rows[("forget", "sgtm", "d8xL1")]["penalty"] is None
    (forget_claim,) = [c for c in cp["claims"] if c["claim"].endswith("on forget for sgtm")]
    assert forget_claim["here"].startswith("no penalty: the fit is flat")


def test_report_renders_fits_of_summaries_written_before_the_interval():
    """The committed compute-penalty summaries predate b's interval (no ``b_lo``): the report
    rebuilds it from b, R^2 and n and marks it so; a new flat fit renders its reason, no penalty."""
    from pipeline.experiments.report import fit_text

    old = json.loads((ROOT / "docs" / "results" / "bilingual_compute_penalty.json").read_text())["fits"]
    for name, fit in old.items():
        assert "b_lo" not in fit
        text = fit_text(name, fit)
        lo, hi = exponent_interval_from_r2(fit["b"], fit["r2"], fit["points"])
        assert 0 < lo < fit["b"] < hi and f"[{lo:.4f}, {hi:.4f}] (95%, from R^2 and n)" in text
        assert "flat" not in text
    flat = fit_power_law([1e12, 1e13, 1e14], [4.0, 4.1, 3.9])
    assert fit_text("retain", flat).endswith(f": no penalty: the fit is flat ({flat['reason']})")


def test_compute_penalty_of_a_flat_fit_is_an_explicit_no_penalty(tmp_path):
    """No-filter losses that do not fall with size, on purpose: the same retain loss at both
    sizes (the fit whose b is rounding noise; the old code raised OverflowError or said 100%) and a
    forget loss that wanders by seed without a trend (the exponent's interval contains 0). Every
    penalty is None with "no penalty: the fit is flat" in the table, the claims, the notes and the
    rendered report; nothing raises and no number stands in for it."""
    from pipeline.experiments.analyses.compute_penalty import compute_penalty_analysis
    from pipeline.experiments.report import build_report

    cells = []
    for seed, eps in enumerate((0.0, 0.1, -0.1)):
        for n_params, d, wander in ((1000, 8, eps), (4000, 16, -eps)):
            f = {"n_params": n_params, "d_model": d}
            cells.append(("no_filter", seed, {"forget": (4.0 + wander, 4.0 + wander), "retain": (4.0, 4.0)}, f))
            cells.append(("sgtm", seed, {"forget": (9.0, 9.0), "retain": (4.2, 4.2)}, {**f, "strategy": "sgtm"}))
    sweep = synthetic_sweep(tmp_path, cells)
    res = compute_penalty_analysis([str(sweep)], str(tmp_path / "analysis"), "test")
    for s, why in (("retain", "the loss is the same at every compute"), ("forget", "interval")):
        assert res["fits"][s]["flat"] and why in res["fits"][s]["reason"]
        assert any(n.startswith(f"{s}: no penalty: the fit is flat") for n in res["notes"])
    assert res["fits"]["forget"]["b_lo"] <= 0 <= res["fits"]["forget"]["b_hi"]
    assert res["runs"] and all(r["penalty"] is None and r["penalty_no_bias"] is None for r in res["runs"])
    assert all(r["penalty"] is None and r["no_penalty"].startswith("no penalty: the fit is flat")
               for r in res["table"])
    assert {c["claim"].rsplit(" on ", 1)[1] for c in res["claims"]} == {"forget for sgtm", "retain for sgtm"}
    assert all(c["here"].startswith("no penalty: the fit is flat (") for c in res["claims"])
    text = build_report([tmp_path / "analysis"], tmp_path / "docs", command="sgtm report").read_text()
    assert "retain: a=4.000" in text and text.count(": no penalty: the fit is flat (") >= 2


def test_moe_analysis_pairs_by_seed_with_intervals_params_and_pending_cells(tmp_path):
    """Known answers on synthetic cells of configs/sweeps/moe.yaml's four methods. A seed effect
    shared by every method (+-0.4 nats) swamps an unpaired (Welch) comparison of the 0.5-nat
    forget-expert advantage; paired by seed it holds with the interval of the per-seed
    differences. A one-seed method has no interval and only inconclusive verdicts; a cell without
    final.json is listed as pending with the command that finishes it; parameter counts come from
    each cell's config.yaml (matched active parameters: the MoE model's extra is its router)."""
    from pipeline.cli import main
    from pipeline.experiments.report import build_report, load_summaries

    shared, small = [0.0, 0.4, -0.4], [0.0, 0.01, -0.01]
    cells = []
    for s in range(3):
        e, d = shared[s], small[s]
        cells += [("dense_sgtm", s, {"forget": (7.0 + e, 6.9 + e, 5.0 + e), "retain": (4.8 + e, 4.75 + e, 4.6 + e)},
                   {"strategy": "sgtm"}),
                  ("expert_sgtm", s, {"forget": (7.5 + e + d, 7.4 + e + d, 5.0 + e),
                                      "retain": (4.7 + e, 4.65 + e, 4.6 + e)}, {"strategy": "sgtm"}),
                  ("weak_filter", s, {"forget": (5.0 + e, 5.0 + e), "retain": (4.5 + e + d, 4.5 + e + d)})]
    cells += [("expert_sgtm_own_first", s, {"forget": (9.0, 9.0, 5.0), "retain": (4.6, 4.6, 4.6)},
               {"strategy": "sgtm"}) for s in (0, 1)]
    sweep = synthetic_sweep(tmp_path, cells, name="moe")
    data = json.loads((sweep / "results.json").read_text())
    models = {"dense_sgtm": ({"arch": "llama3", "d_ff": 384, "n_kv_heads": 2}, {"units": 48, "experts": 0}),
              "expert_sgtm": ({"arch": "llama3-moe", "d_ff": 128, "n_kv_heads": 2, "n_experts": 8, "moe_top_k": 2,
                               "moe_shared_experts": 1}, {"units": 0, "experts": 1})}
    for c in data["cells"]:
        m = c["labels"]["method"]
        model, dom = models["dense_sgtm" if m in ("dense_sgtm", "weak_filter") else "expert_sgtm"]
        cfg = {"model": {"n_layers": 4, "d_model": 128, "n_heads": 8, "vocab_size": 4096, **model},
               "sgtm": {"strategy": c["strategy"], "domains": [{"name": "spanish", "heads": 0, **dom}]}}
        (Path(c["run_dir"]) / "config.yaml").write_text(yaml.safe_dump(cfg))
    pending = next(c for c in data["cells"] if c["labels"] == {"method": "expert_sgtm_own_first", "seed": 1})
    (Path(pending["run_dir"]) / "final.json").unlink()
    out = tmp_path / "analysis" / "bilingual"
    assert main(["analyze", "moe", "--sweeps", str(sweep), "--out", str(out)]) == 0
    res = json.loads((out / "moe.analysis.json").read_text())
    assert (out / "moe.png").is_file()
    rows = {r["method"]: r for r in res["table"]}
    t2 = 4.302653  # t quantile, 2 degrees of freedom, 95%
    assert rows["dense_sgtm"]["seeds"] == 3 and rows["dense_sgtm"]["forget_cal"] == pytest.approx(7.0)
    assert rows["dense_sgtm"]["forget_cal_pm"] == pytest.approx(t2 * 0.4 / math.sqrt(3), rel=1e-4)
    assert rows["dense_sgtm"]["forget_ablation_gap"] == pytest.approx(1.9)
    assert rows["expert_sgtm"]["retain_ablation_gap"] == pytest.approx(0.05)
    own = rows["expert_sgtm_own_first"]
    assert own["seeds"] == 1 and own["forget_cal_pm"] is None and "inconclusive" in own["note"]
    # parameter counts: dense active == total; MoE active = dense + the router (8 x 128 per block)
    assert rows["dense_sgtm"]["params_active"] == rows["dense_sgtm"]["params_total"]
    assert rows["expert_sgtm"]["params_active"] == rows["dense_sgtm"]["params_total"] + 4 * 8 * 128
    assert rows["expert_sgtm"]["params_total"] > rows["expert_sgtm"]["params_active"]
    assert rows["dense_sgtm"]["forget_mlp_params"] == 4 * 48 * 3 * 128
    assert rows["expert_sgtm"]["forget_mlp_params"] == 4 * 3 * 128 * 128
    assert rows["weak_filter"]["forget_mlp_params"] == 0
    claims = {c["claim"]: c for c in res["claims"]}
    (better,) = [c for k, c in claims.items() if k.startswith("forget experts") and "expert_sgtm's" in k]
    half = t2 * 0.01 / math.sqrt(3)
    assert better["holds"] == "holds" and better["diff"]["paired"] and better["diff"]["n"] == 3
    assert better["diff"]["lo"] == pytest.approx(0.5 - half, rel=1e-4)
    assert better["diff"]["hi"] == pytest.approx(0.5 + half, rel=1e-4)
    assert "inconclusive" != better["holds"]  # unpaired (Welch) it would be: the seed effect is +-0.4
    from pipeline.experiments.stats import verdict

    dense = {s: 7.0 + shared[s] for s in range(3)}
    expert = {s: 7.5 + shared[s] + small[s] for s in range(3)}
    assert verdict(diff_interval(expert, {k + 10: v for k, v in dense.items()})) == "inconclusive"
    (own_claim,) = [c for k, c in claims.items() if k.startswith("forget experts") and "own_first" in k]
    assert own_claim["holds"] == "inconclusive" and own_claim["diff"]["n"] == 1  # seed 0 only, no interval
    vs_filter = {k.split("'")[0]: c["holds"] for k, c in claims.items() if "above the weak filter" in k}
    assert vs_filter == {"dense_sgtm": "holds", "expert_sgtm": "holds", "expert_sgtm_own_first": "inconclusive"}
    cost = [c for k, c in claims.items() if k.startswith("expert_sgtm's English loss minus")]
    assert cost[0]["holds"] is None and cost[0]["diff"]["mean"] == pytest.approx(0.2)
    (gap,) = [c for k, c in claims.items() if k.startswith("Spanish ablation gap") and "expert_sgtm minus" in k]
    assert gap["diff"]["mean"] == pytest.approx(0.5) and gap["holds"] is None
    assert res["setup"]["pending"] == ["method=expert_sgtm_own_first,seed=1"]
    assert any("sgtm sweep --config moe" in n and "seed=1" in n for n in res["notes"])
    # the report renders it from its summary, every number traceable
    text = build_report([tmp_path / "analysis"], tmp_path / "docs", command="sgtm report").read_text()
    assert "Forget experts (MoE)" in text and "`bilingual/moe`" not in text.split("## Paper claims")[0]
    assert numbers_not_in_summaries(text, load_summaries(tmp_path / "docs" / "results")) == set()
