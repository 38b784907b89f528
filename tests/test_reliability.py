"""Reliability and security: each test injects a fault and checks that nothing is lost.

Faults are injected deterministically through ``SGTM_FAULT`` (pipeline/components/faults.py),
set per rank. The multi-process scenarios share one chain of launches (module fixture
``chain``): an uninterrupted run, then the same run cut by kill -9 of one rank mid-step, kill -9
during a checkpoint write, SIGTERM, and a final resume; each test asserts one link of it.
Table of faults and tests: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.backend.distributed import free_port
from pipeline.model.shapes import num_params
from tests.support.configs import TRAIN_CONFIG as CONFIG
from tests.support.configs import tiny_overrides
from tests.support.data import bilingual_demo
from tests.support.launch import finish, rank_log, run_scenario, start_ranks, write_result
from tests.support.runs import losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The bilingual demo data with a 1024-token BPE (tests/support/data.py, as tests/test_train.py uses it)."""
    return bilingual_demo(tmp_path_factory.mktemp("data"))


# 8 steps, checkpoints every 2; no calibration (the final eval still runs and is compared)
CHAIN = {"engine.tensor_parallel": 2, "engine.dist_timeout_s": 30, "train.steps": 8, "checkpoint.every": 2,
         "eval.every": 0, "eval.calibrate": False}


# ------------------------------------------------------------------------------ launching
# ``start_ranks(nprocs, args, log, faults)``: ``sgtm train`` on local ranks, ``faults[rank]`` arming
# SGTM_FAULT on that rank; ``finish``: every rank's exit code ("hung" past the timeout) and the
# seconds until the last exit; ``rank_log``: a rank's output (tests/support/launch.py).


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sgtm: error:")]


# ------------------------------------------------------------------------------ the kill/resume chain


@pytest.fixture(scope="module")
def chain(data_dir, tmp_path_factory):
    """2 processes at TP=2, 8 steps, checkpoints every 2 steps:

    full    uninterrupted
    cut     rank 1 SIGKILLs itself inside step 4 (after its first forward)
    resume1 from step 2; both ranks SIGKILL themselves while saving step 4 (files written, no COMPLETE)
    resume2 from step 2 again; rank 0 gets SIGTERM after step 5 (preemption)
    resume3 from step 5 to the end
    """
    tmp = tmp_path_factory.mktemp("chain")
    base = ["--config", str(CONFIG)]
    full_dir, cut_dir = tmp / "full", tmp / "cut"
    obs: dict = {"dir": cut_dir, "full_dir": full_dir, "tmp": tmp}
    t0 = time.time()
    obs["full"] = finish(start_ranks(2, base + tiny_overrides(data_dir, full_dir, **CHAIN), tmp / "full"))
    obs["t_full"] = time.time() - t0
    assert obs["full"][0] == [0, 0], rank_log(tmp / "full", 0)[-3000:]
    args = base + tiny_overrides(data_dir, cut_dir, **CHAIN)
    obs["cut"] = finish(start_ranks(2, args, tmp / "cut", faults={1: "kill_in_step@4"}))
    obs["cut_logs"] = [rank_log(tmp / "cut", r) for r in range(2)]
    obs["cut_latest"] = (cut_dir / "checkpoints" / "latest").read_text().strip()
    obs["cut_losses"] = losses(cut_dir)
    obs["resume1"] = finish(start_ranks(2, args + ["--resume"], tmp / "resume1", faults={0: "kill_in_save@4",
                                                                                     1: "kill_in_save@4"}))
    ck = cut_dir / "checkpoints"
    obs["after_save_kill"] = {"latest": (ck / "latest").read_text().strip(),
                              "step4_files": sorted(p.name for p in (ck / "step00000004").iterdir())
                              if (ck / "step00000004").is_dir() else None}
    from pipeline.components.checkpoint import latest_tag

    obs["after_save_kill"]["resume_tag"] = latest_tag(ck)
    obs["resume2"] = finish(start_ranks(2, args + ["--resume"], tmp / "resume2", faults={0: "sigterm_at@5"}))
    obs["resume2_logs"] = [rank_log(tmp / "resume2", r) for r in range(2)]
    obs["after_sigterm"] = {"latest": latest_tag(ck), "losses": losses(cut_dir),
                            "tags": sorted(p.name for p in ck.iterdir() if p.is_dir())}
    obs["resume3"] = finish(start_ranks(2, args + ["--resume"], tmp / "resume3"))
    obs["resume3_logs"] = [rank_log(tmp / "resume3", r) for r in range(2)]
    obs["seconds"] = time.time() - t0
    print(f"chain: {obs['seconds']:.0f} s (uninterrupted run {obs['t_full']:.0f} s); "
          f"kill mid-step: {obs['cut']}; kill in save: {obs['resume1']}; sigterm: {obs['resume2']}")
    return obs


def test_kill9_of_a_rank_mid_step_stops_the_job_with_a_clear_message(chain):
    (codes, seconds) = chain["cut"]
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, "hung"), chain["cut_logs"][0][-3000:]
    lines = error_lines(chain["cut_logs"][0])
    assert len(lines) == 1 and "lost a peer" in lines[0] and "--resume" in lines[0], chain["cut_logs"][0][-3000:]
    assert "step00000002" in lines[0]
    assert "Traceback" not in chain["cut_logs"][0]
    assert seconds < 120
    assert chain["cut_latest"] == "step00000002" and max(chain["cut_losses"]) == 3


def test_kill9_during_checkpoint_write_keeps_the_previous_checkpoint(chain):
    codes, _ = chain["resume1"]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    after = chain["after_save_kill"]
    files = after["step4_files"]
    # DeepSpeed's files and the rank files were written, COMPLETE was not: never chosen.
    assert files and "mp_rank_00_model_states.pt" in files and "COMPLETE" not in files, files
    assert after["latest"] == "step00000002" and after["resume_tag"] == "step00000002"
    assert "resumed from" in chain["resume2_logs"][0] and "step00000002" in chain["resume2_logs"][0]


def test_sigterm_checkpoints_at_the_step_boundary_exits_zero_and_resume_continues(chain):
    codes, _ = chain["resume2"]
    assert codes == [0, 0], chain["resume2_logs"][0][-3000:]
    after = chain["after_sigterm"]
    assert after["latest"] == "step00000005" and max(after["losses"]) == 5
    assert "SIGTERM: checkpoint written at step 5" in chain["resume2_logs"][0]
    assert "step00000004" in after["tags"]  # the partial step-4 directory was rewritten, now complete
    assert "resumed from" in chain["resume3_logs"][0] and "step00000005" in chain["resume3_logs"][0]


def test_resumed_chain_reproduces_the_uninterrupted_run_bitwise(chain):
    codes, _ = chain["resume3"]
    assert codes == [0, 0] and chain["full"][0] == [0, 0]
    a, b = losses(chain["full_dir"]), losses(chain["dir"])
    assert sorted(a) == list(range(1, 9)) and a == b  # bitwise: JSON floats round-trip exactly
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (chain["full_dir"], chain["dir"]))
    assert fa == fb


# ------------------------------------------------------------------------------ in-process helpers


def _cfg(data_dir, run_dir, **extra):
    from pipeline.config import load_config

    return load_config(CONFIG, tiny_overrides(data_dir, run_dir, **{"eval.every": 0, "eval.calibrate": False,
                                                                    **extra}))


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int, read_only: bool = False):
    """A real tmpfs of ``size_bytes`` at ``path`` (root + mount); yields False where mounting is
    not possible (the tests then inject the same errors)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_bytes}" + (",ro" if read_only else "")
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                            capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _all_tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _all_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _all_tensors(v)]
    return []


def _state_tensors(tag_dir: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(model weights, optimizer tensors) of a TP=1 checkpoint, whatever the ZeRO stage."""
    from pipeline.components.checkpoint import safe_torch_load

    model = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")
    optim = [safe_torch_load(f)["optimizer_state_dict"] for f in sorted(tag_dir.glob("*optim_states.pt"))]
    return _all_tensors(model["module"]), _all_tensors(model.get("optimizer")) + _all_tensors(optim)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ disk full, read-only


def test_disk_full_or_read_only_checkpoint_dir_is_refused_before_training(
        single_process_world, data_dir, tmp_path, monkeypatch):
    """Preflight: free space for one checkpoint (parameters x (weights + Adam states)) and
    writability are checked before the engine is built; nothing else is written."""
    from pipeline.components import checkpoint
    from pipeline.components.checkpoint import CheckpointError
    from pipeline.train.loop import train

    run_dir = tmp_path / "run"
    cfg = _cfg(data_dir, run_dir)
    need = checkpoint.estimate_bytes(num_params(cfg.model), "fp32")
    with tmpfs(run_dir / "checkpoints", 1 << 20) as mounted:
        if not mounted:
            monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 0, 1 << 20))
        t0 = time.time()
        with pytest.raises(CheckpointError) as info:
            train(cfg)
        monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg and "checkpoints" in msg and "MiB free" in msg and f"{need / 2**20:.1f} MiB" in msg
    assert time.time() - t0 < 10 and not (run_dir / "config.yaml").exists()

    with tmpfs(run_dir / "checkpoints", 16 << 20, read_only=True) as mounted:
        if not mounted:
            def refuse(*a, **k):
                raise OSError(30, "Read-only file system", str(a[0]))
            monkeypatch.setattr(checkpoint, "open", refuse, raising=False)
        with pytest.raises(CheckpointError) as info:
            train(cfg)
    assert "\n" not in str(info.value) and "not writable (Read-only file system)" in str(info.value)
    print(f"preflight: tmpfs={'yes' if mounted else 'no (injected)'}; one checkpoint estimated at "
          f"{need / 2**20:.2f} MiB for {num_params(cfg.model)} parameters")


def test_disk_full_during_checkpoint_save_leaves_latest_loadable(
        single_process_world, data_dir, tmp_path, monkeypatch):
    """A tmpfs with room for one checkpoint: the step-2 checkpoint is written, the step-4 one hits
    ENOSPC; the run stops with one line, the partial directory is removed and ``latest`` still
    names step 2, which loads."""
    from pipeline.components import checkpoint
    from pipeline.components.checkpoint import CheckpointError, latest_tag
    from pipeline.train.loop import train
    from pipeline.train.offline import load_any

    run_dir = tmp_path / "run"
    cfg = _cfg(data_dir, run_dir, **{"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 2})
    need = checkpoint.estimate_bytes(num_params(cfg.model), "fp32")
    ck = run_dir / "checkpoints"
    with tmpfs(ck, need + (64 << 10)) as mounted:
        if not mounted:
            monkeypatch.setenv("SGTM_FAULT", "enospc_in_save@4")
        with pytest.raises(CheckpointError) as info:
            train(cfg)
        msg = str(info.value)
        assert "\n" not in msg and "checkpoint of step 4 not written (No space left on device)" in msg, msg
        assert "latest is still step00000002" in msg
        assert (ck / "latest").read_text() == "step00000002" and latest_tag(ck) == "step00000002"
        assert not (ck / "step00000004").exists()
        loaded = load_any(run_dir)
        assert loaded.meta["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in loaded.state.values())
        used = sum(f.stat().st_size for f in (ck / "step00000002").iterdir())
    print(f"disk full in save: tmpfs={'yes' if mounted else 'no (injected ENOSPC)'}; checkpoint "
          f"{used / 2**20:.2f} MiB, estimate {need / 2**20:.2f} MiB")


# ------------------------------------------------------------------------------ non-finite loss/gradients


def test_nonfinite_loss_stops_with_step_and_batch_source(single_process_world, data_dir, tmp_path,
                                                        monkeypatch):
    from pipeline.components.checkpoint import latest_tag
    from pipeline.train.loop import NonFiniteError, train

    run_dir = tmp_path / "run"
    cfg = _cfg(data_dir, run_dir, **{"train.steps": 6, "checkpoint.every": 2, "train.nonfinite": "stop"})
    monkeypatch.setenv("SGTM_FAULT", "nan_loss@3")
    with pytest.raises(NonFiniteError) as info:
        train(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("train.nonfinite: non-finite loss or gradients at step 3")
    assert "documents en#" in msg or "documents es#" in msg, msg
    assert "resume from step00000002" in msg and latest_tag(run_dir / "checkpoints") == "step00000002"


@pytest.mark.parametrize("zero, fault", [(0, "nan_grad@3"), (2, "nan_grad@3")])
def test_nonfinite_step_is_skipped_counted_and_never_applied(single_process_world, data_dir, tmp_path,
                                                             monkeypatch, zero, fault):
    """train.nonfinite=skip: the bad step leaves weights and Adam states bit-identical (checkpoints
    of steps 2 and 3 equal), is counted in metrics and checkpoints, and training goes on."""
    from pipeline.components.checkpoint import safe_torch_load
    from pipeline.train.loop import train

    run_dir = tmp_path / "run"
    cfg = _cfg(data_dir, run_dir, **{"train.steps": 4, "checkpoint.every": 1, "checkpoint.keep": 4,
                                     "train.nonfinite": "skip", "engine.zero_stage": zero})
    monkeypatch.setenv("SGTM_FAULT", fault)
    train(cfg)
    ck = run_dir / "checkpoints"
    s2, s3, s4 = (_state_tensors(ck / f"step0000000{i}") for i in (2, 3, 4))
    assert _same(s2[0], s3[0]) and _same(s2[1], s3[1])  # weights and optimizer state untouched
    assert not _same(s3[0], s4[0]) and all(bool(torch.isfinite(t).all()) for t in s4[0])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["kind"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["action"] == "skipped"
    train_losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert train_losses[3] is None and all(train_losses[s] is not None and train_losses[s] == train_losses[s]
                                           for s in (1, 2, 4))
    client = safe_torch_load(ck / "step00000004" / "mp_rank_00_model_states.pt")
    assert client["nonfinite_steps"] == [3]


# ------------------------------------------------------------------------------ untrusted files


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, path)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_crafted_pickle_checkpoint_is_refused_and_runs_no_code(single_process_world, tmp_path, capsys, zero):
    """A real checkpoint loads through the weights-only loader at every ZeRO stage; the same
    checkpoint with a crafted pickle as its model-states or optimizer file is refused with one
    line naming the file, in resume (DeepSpeed's load) and offline (consolidate), and the
    payload never runs."""
    from pipeline.cli import main
    from pipeline.components import checkpoint
    from pipeline.engine.engine import build_engine, train_step
    from tests.support.batches import mixed_batch
    from tests.support.configs import tiny_config

    cfg = tiny_config("gpt-neo", "sgtm", tp=1, engine={"zero_stage": zero, "micro_batch_size": 6})
    state = build_engine(cfg)
    train_step(state, [mixed_batch()])
    root = tmp_path / "ck"
    checkpoint.save(state.engine, root, 1, {"step": 1}, {"rank": 0}, keep=2)
    tag_dir = root / "step00000001"
    fresh = build_engine(cfg)
    client, rank_state = checkpoint.load(fresh.engine, root, "step00000001")
    assert client["step"] == 1 and rank_state == {"rank": 0}
    for a, b in zip(state.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    victims = ["mp_rank_00_model_states.pt"] + sorted(p.name for p in tag_dir.glob("*optim_states.pt"))
    assert len(victims) == (1 if zero == 0 else 2)
    for victim in victims:
        bad = tmp_path / f"bad_{victim}"
        shutil.copytree(tag_dir, bad / "step00000001")
        (bad / "latest").write_text("step00000001")
        marker = tmp_path / f"pwned_{victim}"
        _plant(bad / "step00000001" / victim, marker)
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load(build_engine(cfg).engine, bad, "step00000001")
        msg = str(info.value)
        assert "\n" not in msg and victim in msg and "refused to load, not a weights-only checkpoint" in msg, msg
        assert not marker.exists()
        if victim.startswith("mp_rank"):
            rc = main(["consolidate", "--checkpoint", str(bad / "step00000001"), "--out", str(tmp_path / "m")])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1 and victim in err[0] and "refused" in err[0], err
            assert not marker.exists() and not (tmp_path / "m").exists()


def test_partial_checkpoint_is_never_loaded(single_process_world, tmp_path):
    from pipeline.components import checkpoint

    root = tmp_path / "ck"
    (root / "step00000009").mkdir(parents=True)
    (root / "step00000004").mkdir()
    (root / "step00000004" / "COMPLETE").write_text("{}")
    (root / "latest").write_text("step00000009")  # stale or forged: names a tag without COMPLETE
    assert checkpoint.latest_tag(root) == "step00000004"
    with pytest.raises(checkpoint.CheckpointError, match="no COMPLETE marker"):
        checkpoint.load(None, root, "step00000009")


def test_unsafe_tar_members_are_refused(tmp_path):
    """Absolute member names as well as '..' (tests/test_data.py covers '..' alone)."""
    import io

    from pipeline.data.errors import DataError
    from pipeline.data.shards import iter_shard_samples

    for name in ("/tmp/evil/000.meta.json", "a/../../000.meta.json"):
        path = tmp_path / "evil.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
        with pytest.raises(DataError, match="unsafe tar member") as err:
            list(iter_shard_samples(path))
        assert "\n" not in str(err.value) and "evil.tar" in str(err.value)


def test_configs_are_parsed_with_a_safe_yaml_loader(tmp_path):
    from pipeline.config import ConfigError, load_config

    marker = tmp_path / "pwned"
    bad = tmp_path / "exp.yaml"
    bad.write_text(f"name: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "\n" not in str(info.value) and "invalid YAML" in str(info.value) and not marker.exists()
    with pytest.raises(ConfigError):
        load_config(CONFIG, [f"name=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert not marker.exists()


# ------------------------------------------------------------------------------ config fuzzing


POSITIVE_INT = ["model.n_layers", "model.d_model", "model.n_heads", "model.d_ff", "model.vocab_size",
                "model.max_seq_len", "engine.micro_batch_size", "engine.grad_accum_steps", "engine.tensor_parallel",
                "train.steps", "train.log_every", "eval.batches", "eval.batch_size", "checkpoint.keep",
                "eval.calibration.batches", "eval.calibration.tokens_per_step", "data.shuffle_buffer"]
NONNEG_INT = ["checkpoint.every", "eval.every", "optimizer.warmup_steps", "train.seed", "data.num_workers",
              "eval.calibration.steps"]
POSITIVE_FLOAT = ["optimizer.lr", "optimizer.eps", "engine.dist_timeout_s", "model.norm_eps", "model.init_std",
                  "eval.calibration.lr"]
NONNEG_FLOAT = ["optimizer.weight_decay", "optimizer.min_lr_ratio", "engine.grad_clip", "eval.calibration.alpha"]
LITERAL = {"engine.zero_stage": [0, 1, 2], "engine.precision": ["fp32", "bf16"], "train.nonfinite": ["skip", "stop"],
           "sgtm.strategy": ["sgtm"], "model.arch": ["gpt-neo", "llama"], "data.filter": ["none", "weak", "strict"]}
SECTIONS = ["model", "engine", "train", "optimizer", "eval", "checkpoint", "sgtm", "data", "data.tagging"]
junk = st.one_of(st.text(min_size=1, max_size=8).filter(lambda s: s.strip() == s and s), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=1))


@st.composite
def invalid_override(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["neg_int", "neg_nonneg", "float_bad", "float_neg", "wrong_type", "literal",
                                 "unknown", "tp"]))
    if kind == "neg_int":
        return draw(st.sampled_from(POSITIVE_INT)), draw(st.integers(max_value=0))
    if kind == "neg_nonneg":
        return draw(st.sampled_from(NONNEG_INT)), draw(st.integers(max_value=-1))
    if kind == "float_bad":
        return draw(st.sampled_from(POSITIVE_FLOAT)), draw(st.one_of(st.floats(max_value=0), st.just("fast"),
                                                                     st.just(float("nan"))))
    if kind == "float_neg":
        return draw(st.sampled_from(NONNEG_FLOAT)), draw(st.floats(max_value=-1e-9, allow_infinity=False))
    if kind == "wrong_type":
        key = draw(st.sampled_from(POSITIVE_INT + NONNEG_INT + POSITIVE_FLOAT + NONNEG_FLOAT))
        value = draw(junk.filter(lambda v: not (isinstance(v, (int, float)) and not isinstance(v, bool))))
        if key in POSITIVE_FLOAT + NONNEG_FLOAT and isinstance(value, bool):
            value = "x"
        return key, value
    if kind == "literal":
        key = draw(st.sampled_from(sorted(LITERAL)))
        return key, draw(st.one_of(st.integers(min_value=3), st.text(min_size=1, max_size=6)).filter(
            lambda v: v not in LITERAL[key] and (not isinstance(v, str) or v.strip() == v)))
    if kind == "unknown":
        section = draw(st.sampled_from(SECTIONS))
        name = draw(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True))
        return f"{section}.{name}_x", draw(st.integers())
    # partitions that do not fit tensor parallelism (tiny-1m: 8 heads, d_ff 512)
    return "engine.tensor_parallel", draw(st.sampled_from([3, 5, 6, 7, 9, 16, 1024]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid_override())
def test_fuzzed_invalid_configs_give_one_line_errors_naming_the_key(override):
    """Wrong types, non-positive sizes, bad choices, unknown keys and TP sizes the partition does
    not fit: always ConfigError, one line, starting with the key (never a deep traceback)."""
    from pipeline.config import ConfigError, load_config

    key, value = override
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, [f"{key}={'.nan' if value != value else json.dumps(value)}"])
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    if key.endswith("_x"):
        assert msg.startswith(f"{key}: unknown key"), msg
    elif key == "engine.tensor_parallel" and value not in (0,) and isinstance(value, int) and value > 0:
        assert msg.startswith(("engine.tensor_parallel:", "sgtm.")), msg
    else:
        assert msg.startswith(f"{key}:"), msg


def test_fuzz_reaches_the_cli_as_one_line_exit_2(capsys):
    from pipeline.cli import main

    for override in ("model.d_model=-64", "engine.dist_timeout_s=0", "train.nonfinite=sometimes",
                     "checkpoint.kepp=3"):
        rc = main(["train", "--config", str(CONFIG), override])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"sgtm: error: {override.split('=')[0]}:"), err


# ------------------------------------------------------------------------------ bad data through `sgtm train`


def test_bad_shards_and_tokenizer_mismatch_stop_sgtm_train_with_one_line(single_process_world, data_dir,
                                                                        tmp_path, capsys):
    """Truncated shards, missing shards and a manifest made with another tokenizer: `sgtm train`
    prints one line naming the file and exits 2; with data.skip_bad_shards the bad shards are
    skipped, counted in the metrics and the checkpointed loader state, and training finishes."""
    from pipeline.cli import main
    from pipeline.components.checkpoint import safe_torch_load

    def broken(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(data_dir, d)
        return d

    cases = {}
    d = broken("truncated")
    for tar in sorted((d / "en").glob("*.tar")):
        tar.write_bytes(tar.read_bytes()[:10_000])
    cases["truncated"] = (d, "corrupt or truncated shard")
    d = broken("missing")
    for tar in sorted((d / "en").glob("*.tar")):
        tar.unlink()
    cases["missing"] = (d, "shard listed in the manifest is missing")
    d = broken("tokenizer")
    manifest = json.loads((d / "es" / "manifest.json").read_text())
    manifest["tokenizer"]["hash"] = "f" * 64
    (d / "es" / "manifest.json").write_text(json.dumps(manifest))
    cases["tokenizer"] = (d, "tokenizer hash")
    for name, (d, what) in cases.items():
        args = ["train", "--config", str(CONFIG), *tiny_overrides(d, tmp_path / f"run_{name}", **{"train.steps": 2})]
        rc = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        lines = [e for e in err if e.startswith("sgtm: error:")]
        assert rc == 2 and len(lines) == 1 and what in lines[0], (name, err[-5:])
        assert ".tar" in lines[0] or "manifest.json" in lines[0], lines[0]

    d = broken("skip")
    tars = sorted((d / "en").glob("*.tar"))
    for tar in tars[:-1]:  # every English shard but one is truncated
        tar.write_bytes(tar.read_bytes()[:10_000])
    run_dir = tmp_path / "run_skip"
    rc = main(["train", "--config", str(CONFIG), *tiny_overrides(d, run_dir, **{
        "train.steps": 2, "eval.every": 0, "data.skip_bad_shards": "true", "checkpoint.every": 2})])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counted = max(r.get("skipped_shards", 0) for r in records if r["kind"] == "train")
    state = json.loads((run_dir / "checkpoints" / "step00000002" / "rank00000.json").read_text())
    assert counted >= 1 and len(state["loader"]["skipped_shards"]) == counted
    assert all(".tar" in s for s in state["loader"]["skipped_shards"])
    assert safe_torch_load(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt")["step"] == 2


# ------------------------------------------------------------------------------ isolation as a guarantee

ISO_STEPS, ISO_CUT = 10, 5


def scenario_isolation_after_resume(out: Path) -> None:
    """2 ranks, TP=2, per-partition clipping that binds, ZeRO 0/1/2. Run A trains straight
    through; run B (different forget-labelled content) is checkpointed at step ISO_CUT, its engine
    discarded, a fresh one resumed from the checkpoint (the same code path as `--resume`), and
    trained on. Rank 0 saves both final full state dicts per stage."""
    import torch.distributed as dist

    from pipeline.codes import Mode
    from pipeline.components import checkpoint
    from pipeline.engine.engine import build_engine, train_step
    from pipeline.model.tp_state import gather_full_state_dict
    from tests.support.batches import isolation_batch
    from tests.support.configs import tiny_config

    for zero in (0, 1, 2):
        engine = {"zero_stage": zero, "micro_batch_size": 4, "grad_clip": 0.05}
        cfg = tiny_config("gpt-neo", "sgtm", tp=2, engine=engine,
                          optimizer={"lr": 3e-3, "weight_decay": 0.1}, train={"steps": ISO_STEPS})
        finals = {}
        for name, seed in (("A", 1), ("B", 2)):
            state = build_engine(cfg)
            for step in range(ISO_STEPS):
                if name == "B" and step == ISO_CUT:
                    root = out / f"ck_zero{zero}"
                    checkpoint.save(state.engine, root, step, {"step": step}, {}, keep=1)
                    del state
                    state = build_engine(cfg)
                    client, _ = checkpoint.load(state.engine, root, checkpoint.latest_tag(root))
                    assert client["step"] == ISO_CUT
                train_step(state, [isolation_batch(step, seed, Mode.FORGET)])
            finals[name] = gather_full_state_dict(state.model)
        if dist.get_rank() == 0:
            torch.save(finals, out / f"iso_zero{zero}.pt")
    dist.barrier()


def test_isolation_holds_after_checkpoint_resume_at_zero_0_1_2(single_process_world, tmp_path):
    """Changing forget-labelled content leaves every retain and joint parameter bit-identical,
    also when one of the two runs was checkpointed, torn down and resumed, at ZeRO 0, 1 and 2."""
    from pipeline.engine.engine import build_model
    from tests.support.configs import tiny_config

    t0 = time.time()
    run_scenario(2, scenario_isolation_after_resume, tmp_path, timeout=400)
    seconds = time.time() - t0
    _, full_model = build_model(tiny_config("gpt-neo", "sgtm", tp=1), single_process_world)
    for zero in (0, 1, 2):
        finals = torch.load(tmp_path / f"iso_zero{zero}.pt", weights_only=True)
        A, B = finals["A"], finals["B"]
        leaked, forget_changed = [], 0
        for name, p in full_model.named_parameters():
            split_dim, classes = p.sgtm_role.split_dim, p.sgtm_role.classes
            for cls in set(classes.tolist()):
                idx = (classes == cls).nonzero().flatten()
                a, b = (t if split_dim is None else t.index_select(split_dim, idx) for t in (A[name], B[name]))
                same = torch.equal(a, b)
                if cls < 0 and not same:
                    leaked.append(f"{name}[class {cls}]")
                forget_changed += int(cls >= 0 and not same)
        assert not leaked, f"ZeRO-{zero}: retain/joint slices changed with forget content: {leaked}"
        assert forget_changed > 0, f"ZeRO-{zero}: forget content did not matter (test has no teeth)"
    print(f"isolation after resume, ZeRO 0/1/2: {seconds:.0f} s")


# ------------------------------------------------------------------------------ a hung (not dead) peer


def scenario_hung_peer(out: Path) -> dict:
    """Rank 1 stops answering (sleeps, sockets open: no connection reset) until rank 0 has written
    its result; rank 0's collectives on the world and on megatron's TP group must fail after
    engine.dist_timeout_s. Both leave with ``os._exit`` (no teardown through the hung group)."""
    from megatron.core import parallel_state as ps

    from pipeline.backend.distributed import init_distributed
    from pipeline.config import EngineConfig
    from pipeline.train.loop import _is_comm_failure

    d = init_distributed(EngineConfig(tensor_parallel=2, dist_timeout_s=4))
    if d.rank == 1:
        deadline = time.time() + 300
        while not (out / "result.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        os._exit(0)
    result = {}
    for name, group in (("world", None), ("tp", ps.get_tensor_model_parallel_group())):
        t0 = time.time()
        try:
            torch.distributed.all_reduce(torch.ones(1), group=group)
            result[name] = {"error": None}
        except Exception as exc:  # noqa: BLE001
            result[name] = {"error": str(exc).splitlines()[0][:300], "seconds": time.time() - t0,
                            "comm_failure": _is_comm_failure(exc)}
    write_result(out, result)
    os._exit(0)


def test_a_hung_peer_is_given_up_after_the_dist_timeout(tmp_path):
    result = run_scenario(2, scenario_hung_peer, tmp_path, timeout=240)
    for name in ("world", "tp"):
        r = result[name]
        assert r["error"] and r["comm_failure"] and 3 < r["seconds"] < 60, (name, r)
    print(f"hung peer: world collective gave up after {result['world']['seconds']:.1f} s, TP group after "
          f"{result['tp']['seconds']:.1f} s (engine.dist_timeout_s=4): {result['world']['error'][:120]}")


def test_engine_builds_again_after_shutdown_in_the_same_process(single_process_world):
    """`sgtm train` called in-process (a notebook, a sweep driver) tears the world down on exit; the
    next run in that process must get live groups, not megatron's handles on the destroyed one."""
    from pipeline.backend.distributed import init_distributed, shutdown_distributed
    from pipeline.config import EngineConfig
    from pipeline.engine.engine import build_engine, train_step
    from tests.support.batches import mixed_batch
    from tests.support.configs import tiny_config

    shutdown_distributed()
    assert not torch.distributed.is_initialized()
    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(EngineConfig(tensor_parallel=1))
    state = build_engine(tiny_config("gpt-neo", "sgtm", tp=1))
    loss = train_step(state, [mixed_batch()])
    assert torch.isfinite(torch.as_tensor(loss))

