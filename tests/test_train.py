"""The experiment runner end to end: train, evaluate, checkpoint, kill, resume, calibrate, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.support import ROOT
from tests.support.configs import TRAIN_CONFIG as CONFIG
from tests.support.configs import tiny_overrides
from tests.support.data import bilingual_demo
from tests.support.launch import start_ranks, wait_all
from tests.support.runs import losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return bilingual_demo(tmp_path_factory.mktemp("data"))


def test_tp2_run_killed_and_resumed_matches_uninterrupted(data_dir, tmp_path):
    """2 processes at TP=2: train, eval and checkpoint; kill -9 after the step-4 checkpoint;
    --resume; every later step's loss and the final eval equal an uninterrupted run bit for bit."""
    base = ["--config", str(CONFIG)]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    wait_all(start_ranks(2, base + tiny_overrides(data_dir, full_dir, **{"engine.tensor_parallel": 2}),
                         tmp_path / "full"), tmp_path / "full")
    procs = start_ranks(2, base + tiny_overrides(data_dir, cut_dir, **{"engine.tensor_parallel": 2}), tmp_path / "cut")
    deadline = time.time() + 300
    while not (cut_dir / "checkpoints" / "latest").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint appeared"
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    killed_at = max(losses(cut_dir))
    assert killed_at < 12
    wait_all(start_ranks(2, base + tiny_overrides(data_dir, cut_dir, **{"engine.tensor_parallel": 2}) + ["--resume"],
                         tmp_path / "resume"), tmp_path / "resume")
    a, b = losses(full_dir), losses(cut_dir)
    assert sorted(a) == list(range(1, 13)) and sorted(b) == sorted(a)
    assert a == b  # bitwise (JSON floats round-trip exactly)
    assert a[12] < a[1]
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (full_dir, cut_dir))
    assert fa == fb and fa["forget_full"] > 0 and "retain_calibrated" in fa
    assert (cut_dir / "eval" / "step00000012_forget_per_token.npz").is_file()


def test_sigterm_checkpoints_and_exits_zero(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", str(CONFIG)] + tiny_overrides(data_dir, run_dir, **{"train.steps": 400, "checkpoint.every": 0})
    procs = start_ranks(1, args, tmp_path / "term")
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 3:
        assert time.time() < deadline and procs[0].poll() is None
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=120) == 0
    from pipeline.components.checkpoint import latest_tag

    tag = latest_tag(run_dir / "checkpoints")
    assert tag is not None and int(tag[4:]) == max(losses(run_dir)) < 400


def _tiny_loaded(data_dir, tmp_path):
    """Train a tiny single-process run and return its loaded, consolidated model."""
    from pipeline.config import load_config
    from pipeline.train.loop import train
    from pipeline.train.offline import load_any

    run_dir = tmp_path / "single"
    cfg = load_config(CONFIG, tiny_overrides(data_dir, run_dir, **{"train.steps": 6, "eval.every": 0}))
    train(cfg)
    return run_dir, load_any(run_dir)


def test_calibration_only_changes_the_bias_lowers_retain_loss_and_is_deterministic(
        single_process_world, data_dir, tmp_path):
    from pipeline.components.evaluation import evaluate, fit_calibration_bias
    from pipeline.train.loop import eval_sets
    from pipeline.train.offline import single_process_model

    _, loaded = _tiny_loaded(data_dir, tmp_path)
    model, dist = single_process_model(loaded)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evals, calib = eval_sets(loaded.cfg)
    cal = loaded.cfg.eval.calibration
    b1 = fit_calibration_bias(model, calib, [0], cal, dist.device, seed=3)
    b2 = fit_calibration_bias(model, calib, [0], cal, dist.device, seed=3)
    assert torch.equal(b1, b2) and b1.abs().sum() > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    res = evaluate(model, calib, calib, [0], cal, dist.device)  # on the calibration data itself
    assert res["retain"].calibrated < res["retain"].ablated


def test_ablate_and_export_hf_load_offline_and_match_logits(single_process_world, data_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.export_hf import export_hf
    from pipeline.train.offline import ablate_checkpoint, load_any, single_process_model

    run_dir, loaded = _tiny_loaded(data_dir, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, src in (("full", run_dir), ("ablated", None)):
        if src is None:
            src = ablate_checkpoint(run_dir, tmp_path / "ablated_model")
        out = export_hf(src, tmp_path / f"hf_{name}")
        hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        ids = torch.tensor([tok("the little dog ran to the park and saw a big red ball")["input_ids"]])
        ours, _ = single_process_model(load_any(src))
        with torch.no_grad():
            mine = ours(ids)[..., : loaded.cfg.model.vocab_size]
            theirs = hf(ids).logits
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)
    # The ablated export carries zero forget slices (head 1 of every block, units 0..31).
    hd = loaded.cfg.model.head_dim
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_ablated", local_files_only=True).state_dict()
    w = sd["transformer.h.0.attn.c_proj.weight"]  # [in, out]: head 1's input rows
    assert (w[hd:2 * hd] == 0).all() and (w[:hd] != 0).any()
    assert (sd["transformer.h.1.mlp.c_fc.weight"][:, :32] == 0).all()


def test_llama_export_matches_logits(single_process_world, tmp_path, monkeypatch):
    """Llama family: RoPE, RMSNorm and the [gate; up] layout map onto LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_config
    from pipeline.engine.engine import build_model
    from pipeline.model.tp_state import gather_full_state_dict
    from pipeline.train.export_hf import export_hf
    from pipeline.train.offline import LoadedModel, write_model_dir

    cfg = load_config(data={"model": {"base": "models/tiny-llama-1m.yaml", "vocab_size": 1000, "n_layers": 2,
                                      "max_seq_len": 32}})
    _, model = build_model(cfg, single_process_world)
    src = write_model_dir(LoadedModel(cfg, gather_full_state_dict(model), {"partition": {}, "ablated_domains": []}),
                          tmp_path / "llama_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_hf(src, tmp_path / "hf_llama")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[..., :1000], rtol=0, atol=1e-4)


@pytest.mark.parametrize("override, key", [
    ("model.n_headz=4", "model.n_headz"),
    ("engine.micro_batch_size=big", "engine.micro_batch_size"),
    ("engine.tensor_parallel=3", "engine.tensor_parallel"),
    ("data.filter=sometimes", "data.filter"),
])
def test_train_cli_config_errors_are_one_line(override, key):
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG), override],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("sgtm: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"sgtm: error: {key}:"), r.stderr[-2000:]


def test_eval_cli_writes_json_for_a_checkpoint(data_dir, tmp_path):
    """`sgtm eval --checkpoint RUN` prints and writes full/ablated/calibrated losses per set."""
    from pipeline.config import load_config
    from pipeline.train.loop import train

    run_dir = tmp_path / "evalrun"
    train(load_config(CONFIG, tiny_overrides(data_dir, run_dir, **{"train.steps": 4, "eval.every": 0})))
    out = tmp_path / "eval.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--checkpoint", str(run_dir), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["step"] == 4 and set(report["sets"]) == {"forget", "retain"}
    assert " eval: forget: " in r.stderr and " eval: calibration step " in r.stderr  # batch-job progress
    final = json.loads((run_dir / "final.json").read_text())
    # The offline evaluation reproduces the training job's own final evaluation.
    assert report["sets"]["forget"]["ablated"] == pytest.approx(final["forget_ablated"], abs=1e-5)
    assert report["sets"]["retain"]["calibrated"] == pytest.approx(final["retain_calibrated"], abs=1e-5)
