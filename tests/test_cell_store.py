"""The committed cell store (pipeline/experiments/cells.py): summaries round-trip into the same
analysis cells as results.json, staleness (NUMERICS_VERSION, evaluation version, config) decides
what `sgtm sweep` re-runs, writes are atomic, histories are thinned with both ends kept. No
training here: run dirs are written by hand (final.json, metrics.jsonl, deployed.json,
tokens.json, cell.json), and `run_cell` is replaced by a fake that writes them; the real tiny
sweep through the store is in tests/test_experiments.py (the ``tiny_sweep`` fixture)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.experiments import cells
from pipeline.experiments import sweep as sw

# what the bilingual prepare step would return, without preparing anything
FAKE_DATA = {"sources": [{"path": "PREFIX/data/bilingual_v4096/en", "true_label": "retain"},
                         {"path": "PREFIX/data/bilingual_v4096/es", "true_label": "forget:spanish"}],
             "domains": ["spanish"], "tokenizer": "PREFIX/data/bilingual_v4096/bpe4096.json", "filter": "none",
             "tagging": {"source": "simulated", "undiscovered_rate": 0.2, "retain_fraction": 0.25}}
LOSSES = {"sgtm": (8.0, 4.9), "weak_filter": (6.0, 4.6)}  # (forget, retain) deployed_calibrated


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """A 2 methods x 2 seeds sweep on the shipped bilingual base with the data step faked, and a
    ``finish(cell)`` that writes what training and the deployed evaluation would have."""
    from pipeline.experiments.deployed import VERSION

    def prepare(spec, out):
        return json.loads(json.dumps(FAKE_DATA).replace("PREFIX", str(out)))

    monkeypatch.setattr(sw, "prepare_data", prepare)
    spec = {"name": "fake", "base": "sweeps/bilingual_base.yaml", "data": {"prepare": "bilingual"},
            "overrides": ["train.steps=30"],
            "grid": {"method": {"sgtm": ["sgtm.strategy=sgtm", "data.filter=none"],
                                "weak_filter": ["sgtm.strategy=none", "data.filter=weak"]}},
            "seeds": [0, 1]}
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(spec))

    def finish(cell: sw.Cell, numerics: int | None | str = "today", steps: int = 30) -> None:
        run = Path(cell.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        m, seed = cell.labels["method"], cell.labels["seed"]
        f, r = LOSSES[m]
        hist = [{"kind": "eval", "step": s, "forget_full": f - 1 + s / 100, "forget_ablated": f + s / 100,
                 "retain_full": r + 1 - s / 100, "retain_ablated": r + 1.1 - s / 100}
                for s in range(1, steps + 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
        (run / "final.json").write_text(json.dumps({**hist[-1], "forget_calibrated": f}))
        sets = {"forget": {"full": f - 1, "deployed": f + 0.01, "deployed_calibrated": f + 0.1 * seed, "tokens": 99},
                "retain": {"full": r, "deployed": r + 0.02, "deployed_calibrated": r + 0.1 * seed, "tokens": 99}}
        (run / "deployed.json").write_text(json.dumps(
            {"version": VERSION, "run_dir": str(run), "checkpoint": str(run / "checkpoints"), "step": steps,
             "deployed_model": "ablated" if m == "sgtm" else "full", "sets": sets}))
        (run / "tokens.json").write_text(json.dumps({"forget_unlabelled": 10 + seed, "forget_labelled": 40,
                                                     "forget_total": 50 + seed, "total": 500}))
        sw.write_cell_json(run, cell, "fake")
        if numerics != "today":  # a run of other (or unrecorded) numerics
            info = json.loads((run / "cell.json").read_text())
            info["numerics_version"] = numerics
            (run / "cell.json").write_text(json.dumps(info))

    def resolved(out: Path) -> list[sw.Cell]:
        s = sw.load_sweep(path)
        return sw.resolve(sw.expand(s), sw.write_base(s, out), out)

    return path, finish, resolved


def _quiet(msg: str) -> None:
    pass


# ------------------------------------------------------------------------------ round trip


def test_store_round_trip_gives_the_analyses_the_same_cells_as_results_json(fake_sweep, tmp_path):
    """Cells stored from their run dirs (`sgtm sweep --store-only`) load, through the one loader,
    into the same per-cell data as results.json + run dirs, and an analysis gives the same table
    from either; the stored cells need no run dir (they are moved away before the second load)."""
    from pipeline.experiments.analyses.seeds import seeds
    from pipeline.experiments.common import load_cells
    from pipeline.experiments.counts import count_tokens

    path, finish, resolved = fake_sweep
    out, store = tmp_path / "out", tmp_path / "store"
    for c in resolved(out):
        finish(c)
    res = sw.run_sweep(path, out, store=store, store_only=True, log=_quiet)
    assert res["failed"] == [] and res["untrained"] == []
    files = sorted(p.name for p in (store / "fake").glob("*.json"))
    assert files == ["_grid.json", "method=sgtm__seed=0.json", "method=sgtm__seed=1.json",
                     "method=weak_filter__seed=0.json", "method=weak_filter__seed=1.json"]
    from_runs = {json.dumps(c["labels"]): c for c in load_cells([out / "fake"])}
    a_runs = seeds([str(out / "fake")], str(tmp_path / "a1"), "test")
    os.rename(out / "cells", tmp_path / "moved")  # the store needs no run dir
    from_store = {json.dumps(c["labels"]): c for c in load_cells([store / "fake"])}
    assert from_runs.keys() == from_store.keys() and len(from_store) == 4
    for k, a in from_runs.items():
        b = from_store[k]
        assert b["run_dir"] is None and b["done"] and a["done"]
        for field in ("key", "config_hash", "labels", "overrides", "final", "strategy", "filter",
                      "undiscovered_rate", "d_model", "n_layers", "n_params", "steps", "seed", "tokens_per_step",
                      "tokens", "retain_fraction", "lr", "vocab_size", "seq_len"):
            assert a[field] == b[field], field
        assert len(a["history"]) == 30 and b["history"] == cells.thin(a["history"])
        assert b["history"][0] == a["history"][0] and b["history"][-1] == a["history"][-1]
        dep = {k2: v for k2, v in a["deployed_eval"].items() if k2 not in ("run_dir", "checkpoint")}
        assert b["deployed_eval"] == dep
        assert count_tokens(b) == json.loads((tmp_path / "moved" / a["key"] / "tokens.json").read_text())
    a_store = seeds([str(store / "fake")], str(tmp_path / "a2"), "test")
    assert a_store["table"] == a_runs["table"]
    assert "fake (cell store): 4 of 4 cells finished" in a_store["notes"][0]
    # each summary's hash is the hash of the config it holds (anyone can check it)
    for f in (store / "fake").glob("method=*.json"):
        s = json.loads(f.read_text())
        assert cells.config_hash(s["config"]) == s["config_hash"] and s["numerics_version"] == cells.NUMERICS_VERSION
        assert s["code"]["commit"] and "run_dir" not in json.dumps(s["deployed_eval"])


def test_a_bare_sweep_name_resolves_to_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(cells, "STORE_ROOT", tmp_path / "cells")
    (tmp_path / "cells" / "mysweep").mkdir(parents=True)
    (tmp_path / "cells" / "mysweep" / cells.GRID_FILE).write_text(json.dumps({"sweep": "mysweep", "cells": []}))
    monkeypatch.chdir(tmp_path)
    assert cells.resolve_source("mysweep") == ("store", tmp_path / "cells" / "mysweep")
    with pytest.raises(FileNotFoundError, match="no cell store"):
        cells.resolve_source("nosuchsweep")


def test_config_hash_ignores_machine_paths_and_sees_everything_else():
    raw = {"name": "a", "run_dir": "/m1/runs/x", "optimizer": {"lr": 0.002},
           "data": {"sources": [{"path": "/m1/runs/sweeps/data/bilingual_v4096/en", "tags": None}],
                    "tokenizer": "/m1/runs/sweeps/data/bilingual_v4096/bpe4096.json"}}
    other_machine = json.loads(json.dumps(raw).replace("/m1/runs", "relative/elsewhere"))
    other_machine.update(name="b", run_dir="z")
    assert cells.config_hash(raw) == cells.config_hash(other_machine)
    for change in (lambda r: r["optimizer"].update(lr=0.001),
                   lambda r: r["data"]["sources"][0].update(path="/m1/runs/sweeps/data/bilingual_v8192/en"),
                   lambda r: r["data"].update(tokenizer="gpt2")):
        changed = json.loads(json.dumps(raw))
        change(changed)
        assert cells.config_hash(changed) != cells.config_hash(raw)


# ------------------------------------------------------------------------------ staleness


def _check_staleness(staleness) -> None:
    """The staleness rule on summaries, written against a given implementation so the mutation
    test below can show that one ignoring NUMERICS_VERSION fails it."""
    from pipeline.experiments.deployed import VERSION

    ok = {"numerics_version": cells.NUMERICS_VERSION, "eval_version": VERSION, "config_hash": "h1"}
    assert staleness(ok, "h1") is None and staleness(ok) is None
    assert staleness(None, "h1") == "not stored"
    def why(summary: dict, want: str = "h1") -> str:
        reason = staleness(summary, want)
        assert reason is not None, f"{summary} counted as current"
        return reason

    assert "NUMERICS_VERSION" in why(dict(ok, numerics_version=cells.NUMERICS_VERSION - 1))
    assert "NUMERICS_VERSION" in why(dict(ok, numerics_version=None))  # unrecorded: stale
    assert "evaluation" in why(dict(ok, eval_version=VERSION - 1))
    assert "config" in why(ok, "h2")


def test_staleness_rule_and_its_mutation():
    _check_staleness(cells.staleness)
    # mutation: a rule that ignores NUMERICS_VERSION keeps pre-change cells; the check catches it
    def ignores_numerics(summary, want_hash=None):
        if summary is not None:
            summary = dict(summary, numerics_version=cells.NUMERICS_VERSION)
        return cells.staleness(summary, want_hash)

    with pytest.raises(AssertionError):
        _check_staleness(ignores_numerics)


def test_numerics_version_postdates_the_loss_normalisation_change():
    """Cells trained before commit 10346b7 (the training loss divided by the labelled count) are
    NUMERICS_VERSION 1; today's code is later, so they are stale."""
    assert cells.NUMERICS_VERSION >= 2
    assert cells.staleness({"numerics_version": 1, "eval_version": 0}) is not None


def test_decide_what_sweep_does_with_a_cell():
    from pipeline.experiments.deployed import VERSION

    now = cells.NUMERICS_VERSION
    cur = {"numerics_version": now, "eval_version": VERSION, "config_hash": "h"}
    old = dict(cur, numerics_version=now - 1)
    assert cells.decide(cur, "h", False, None, False)[0] == "skip"  # no run dir needed
    assert cells.decide(None, "h", False, None, False)[0] == "train"
    assert cells.decide(old, "h", False, None, False)[0] == "train"
    assert cells.decide(cur, "other", False, None, False)[0] == "train"  # config changed
    assert cells.decide(old, "h", True, now, True)[0] == "store"  # the run here is current: no retraining
    assert cells.decide(None, "h", True, now - 1, True)[0] == "retrain"  # finished under old numerics
    assert cells.decide(None, "h", True, None, True)[0] == "retrain"  # finished, numerics unrecorded
    assert cells.decide(None, "h", False, now - 1, True)[0] == "retrain"  # half-trained under old numerics
    assert cells.decide(None, "h", False, now, True)[0] == "train"  # half-trained today: resumes


def test_sweep_reruns_stale_cells_and_skips_current_ones(fake_sweep, tmp_path, monkeypatch):
    """`sgtm sweep` with training faked: the first run trains and stores every cell; the second
    trains nothing, even with the run dirs gone; a NUMERICS_VERSION bump re-runs every cell (a run
    dir of the old numerics is set aside, not resumed); a changed config re-runs its cell; a cell
    another sweep stored identically is copied, not trained."""
    path, finish, resolved = fake_sweep
    out, store = tmp_path / "out", tmp_path / "store"
    trained: list[dict] = []

    def fake_run_cell(base, cell, log=print):
        assert not Path(cell.run_dir, "final.json").exists(), "a stale run dir was reused"
        trained.append(cell.labels)
        finish(cell)
        return True

    monkeypatch.setattr(sw, "run_cell", fake_run_cell)
    sw.run_sweep(path, out, store=store, log=_quiet)
    assert len(trained) == 4 and len(list((store / "fake").glob("method=*.json"))) == 4
    trained.clear()
    logged: list[str] = []
    sw.run_sweep(path, out, store=store, log=logged.append)
    assert trained == [] and sum("skip finished" in m for m in logged) == 4
    os.rename(out / "cells", tmp_path / "gone")
    sw.run_sweep(path, tmp_path / "out2", store=store, log=_quiet)  # another machine: no run dirs
    assert trained == []
    os.rename(tmp_path / "gone", out / "cells")

    # a NUMERICS_VERSION bump: every stored cell and every run dir is stale
    monkeypatch.setattr(cells, "NUMERICS_VERSION", cells.NUMERICS_VERSION + 1)
    assert len(sw.pending_selectors(path, out, store=store)) == 4
    logged.clear()
    real_run_cell = sw.run_cell

    def set_aside_then_train(base, cell, log=print):
        sw.set_aside_if_stale(Path(cell.run_dir), log)  # what the real run_cell does under its lock
        return fake_run_cell(base, cell, log)

    monkeypatch.setattr(sw, "run_cell", set_aside_then_train)
    sw.run_sweep(path, out, store=store, log=logged.append)
    assert len(trained) == 4 and sum("set aside" in m for m in logged) == 4
    for c in resolved(out):
        assert len(list(Path(c.run_dir, "superseded").iterdir())) == 1
        s = json.loads(cells.summary_path(store / "fake", c.labels).read_text())
        assert s["numerics_version"] == cells.NUMERICS_VERSION
    monkeypatch.setattr(sw, "run_cell", real_run_cell)

    # a changed config (the sweep's overrides) re-runs its cells; dry run shows why
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] = ["train.steps=40"]
    path.write_text(yaml.safe_dump(spec))
    logged.clear()
    sw.run_sweep(path, out, store=store, dry_run=True, log=logged.append, only=["method=sgtm,seed=0"])
    (line,) = [m for m in logged if "would" in m]
    assert "would train method=sgtm,seed=0 (its config differs from the sweep's)" in line

    # another sweep with the identical cell copies it from the store
    twin = tmp_path / "twin.yaml"
    twin.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "name": "twin",
                                    "overrides": ["train.steps=30"]}))
    trained.clear()
    monkeypatch.setattr(sw, "run_cell", fake_run_cell)
    logged.clear()
    sw.run_sweep(twin, tmp_path / "out3", store=store, log=logged.append)
    assert trained == [] and sum("copied the identical cell" in m for m in logged) == 4
    s = json.loads((store / "twin" / "method=sgtm__seed=1.json").read_text())
    assert s["sweep"] == "twin" and s["copied_from"] == "fake/method=sgtm__seed=1"


def test_analyses_skip_stale_stored_cells_with_one_warning(fake_sweep, tmp_path, capsys):
    from pipeline.experiments.common import coverage_note, load_cells

    path, finish, resolved = fake_sweep
    out, store = tmp_path / "out", tmp_path / "store"
    for c in resolved(out):
        finish(c)
    sw.run_sweep(path, out, store=store, store_only=True, log=_quiet)
    for name in ("method=sgtm__seed=0", "method=weak_filter__seed=1"):
        f = store / "fake" / f"{name}.json"
        f.write_text(json.dumps(dict(json.loads(f.read_text()), numerics_version=1)))
    capsys.readouterr()
    got = load_cells([store / "fake"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(got) == 2 and len(err) == 1
    assert err[0] == (f"[cells] warning: fake: skipped 2 stale stored cells (2 trained at NUMERICS_VERSION 1, "
                      f"now {cells.NUMERICS_VERSION})")
    note = coverage_note([store / "fake"])
    assert "2 of 4 cells finished" in note and "skipped 2 stale stored cells" in note
    # a summary of a cell the grid no longer has is skipped too (it would double a seed)
    orphan = store / "fake" / "method=gone__seed=0.json"
    orphan.write_text((store / "fake" / "method=sgtm__seed=1.json").read_text())
    assert len(load_cells([store / "fake"], log=_quiet)) == 2


def test_store_only_after_an_array_job_and_legacy_runs(fake_sweep, tmp_path):
    """`--store-only` stores finished runs of today's numerics; a finished run without a recorded
    NUMERICS_VERSION (from before the store) is not stored: it needs training."""
    path, finish, resolved = fake_sweep
    out, store = tmp_path / "out", tmp_path / "store"
    cs = resolved(out)
    finish(cs[0])
    finish(cs[1], numerics=None)
    res = sw.run_sweep(path, out, store=store, store_only=True, log=_quiet)
    assert [p.stem for p in (store / "fake").glob("method=*.json")] == [cells.cell_name(cs[0].labels)]
    assert sorted(res["untrained"]) == sorted(cells.selector(c.labels) for c in cs[1:])
    # --slurm: the stale run dir is set aside and every pending cell gets its cell.json
    sw.run_sweep(path, out, store=store, slurm=True, log=_quiet)
    lines = (out / "fake" / "cells.txt").read_text().splitlines()
    assert len(lines) == 3 and (Path(cs[1].run_dir) / "superseded").is_dir()
    assert all(json.loads((Path(c.run_dir) / "cell.json").read_text())["numerics_version"] == cells.NUMERICS_VERSION
               for c in cs)


# ------------------------------------------------------------------------------ writing


def test_atomic_write_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    f = tmp_path / "s" / "cell.json"
    cells.atomic_write_json(f, {"a": 1})
    assert json.loads(f.read_text()) == {"a": 1} and f.stat().st_mode & 0o777 == 0o644  # readable, committable

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cells.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cells.atomic_write_json(f, {"a": 2, "big": "x" * 100_000})
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"a": 1}
    assert [p.name for p in f.parent.iterdir()] == ["cell.json"]  # no temporary file left behind
    cells.atomic_write_json(f, {"a": 3})
    assert json.loads(f.read_text()) == {"a": 3}


def test_grid_file_is_rewritten_only_when_it_changes(tmp_path):
    g = cells.write_grid(tmp_path, "s", "configs/sweeps/s.yaml", [({"m": "a"}, "h1")])
    before = g.stat().st_mtime_ns
    os.utime(g, ns=(before - 10**9, before - 10**9))
    cells.write_grid(tmp_path, "s", "configs/sweeps/s.yaml", [({"m": "a"}, "h1")])
    assert g.stat().st_mtime_ns == before - 10**9
    cells.write_grid(tmp_path, "s", "configs/sweeps/s.yaml", [({"m": "a"}, "h2")])
    assert json.loads(g.read_text())["cells"][0]["config_hash"] == "h2"


# ------------------------------------------------------------------------------ thinning


def _check_thin(thin, n: int, limit: int) -> None:
    hist = [{"step": i} for i in range(n)]
    got = thin(hist, limit)
    assert len(got) <= limit and len(got) == min(n, limit)
    assert [h["step"] for h in got] == sorted({h["step"] for h in got})  # in order, no repeats
    if n:
        assert got[0] == hist[0] and got[-1] == hist[-1]


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 400), st.integers(2, 40))
def test_thinning_keeps_first_and_last_and_is_bounded(n, limit):
    _check_thin(cells.thin, n, limit)


def test_thinning_mutation_that_strides_drops_the_last_point():
    def strided(history, limit):  # every k-th record: bounded, but the last evaluation can fall out
        k = -(-len(history) // limit)
        return history[::k]

    with pytest.raises(AssertionError):
        _check_thin(strided, 30, 20)


# ------------------------------------------------------------------------------ background runner


def test_background_runner_commits_each_cell_and_only_the_store(tmp_path):
    """tools/sweep_in_background.sh in a scratch git repo with a stub `sgtm` (two pending cells):
    one commit per finished cell, each touching only docs/results/cells/<sweep>; another file's
    staged and unstaged edits stay out of those commits; the cells run with nice and one thread."""
    import shutil
    import subprocess

    from tests.conftest import ROOT

    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "sweep_in_background.sh", repo / "tools")
    stub = repo / "sgtm-stub"
    stub.write_text("""#!/usr/bin/env bash
args="$*"
echo "$OMP_NUM_THREADS $SGTM_CELL_THREADS $(nice)" >> calls.log
case $args in
  *--pending*) printf 'method=a,seed=0\\nmethod=b,seed=0\\n' ;;
  *--store-only*) ;;
  *) sel=${args##*--only }; mkdir -p docs/results/cells/fake; echo '{}' > "docs/results/cells/fake/$sel.json" ;;
esac
""")
    py = repo / "py-stub"
    py.write_text("#!/usr/bin/env bash\necho fake\n")
    for f in (stub, py):
        f.chmod(0o755)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "other.txt").write_text("v1\n")
    (repo / "calls.log").write_text("")
    git("add", "other.txt", "calls.log")
    git("commit", "-q", "-m", "start")
    (repo / "other.txt").write_text("v2 staged\n")
    git("add", "other.txt")
    (repo / "other.txt").write_text("v3 unstaged\n")
    env = dict(os.environ, SGTM=str(stub), PY=str(py))
    r = subprocess.run(["bash", "tools/sweep_in_background.sh", "configs/sweeps/fake.yaml"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    log = git("log", "--format=%s", "--name-only").split("\n\n")
    subjects = git("log", "--format=%s").splitlines()
    assert subjects == ["cells: fake method=b,seed=0", "cells: fake method=a,seed=0", "start"], log
    for rev, sel in (("HEAD", "method=b,seed=0"), ("HEAD~1", "method=a,seed=0")):
        files = git("show", "--format=", "--name-only", rev).split()
        assert files == [f"docs/results/cells/fake/{sel}.json"]
    assert git("show", "HEAD:other.txt") == "v1\n"
    assert git("diff", "--cached", "--name-only").split() == ["other.txt"]  # still staged, not committed
    assert (repo / "other.txt").read_text() == "v3 unstaged\n"
    calls = (repo / "calls.log").read_text().splitlines()
    assert calls and all(c.split() == ["1", "1", "19"] for c in calls)
