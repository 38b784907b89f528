"""Logs a batch job can read: plain progress lines when stderr is not a terminal (every value the
same as metrics.jsonl), evaluation/calibration progress, no megatron import noise, W&B offline
mirroring the metrics, and a one-line error when W&B is asked for but not installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.data import small_bilingual

CONFIG = ROOT / "configs" / "experiments" / "bilingual_tiny.yaml"
NO_WANDB = "import sys; sys.modules['wandb'] = None; from pipeline.cli import main; sys.exit(main())"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return small_bilingual(tmp_path_factory.mktemp("data"))


def overrides(data: dict[str, str], run_dir: Path, **extra) -> list[str]:
    o = {
        "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 256,
        "sgtm.domains": "[{name: spanish, heads: [1], units: 32}]",
        "engine.micro_batch_size": 4, "engine.grad_clip": 1.0, "train.steps": 6, "train.log_every": 2,
        "optimizer.warmup_steps": 2, "eval.every": 4, "eval.batches": 1, "eval.batch_size": 4,
        "eval.calibration": "{steps: 8, batches: 1, tokens_per_step: 128}", "checkpoint.every": 0,
        "run_dir": str(run_dir), **data,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def records(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def test_batch_job_log_has_a_line_per_log_every_steps_and_no_megatron_warnings(data, tmp_path):
    """`sgtm train` with stderr to a file (as under SLURM), wandb made unimportable: a timestamped
    line at steps 2, 4, 6 whose loss, lr and per-partition grad norms are metrics.jsonl's;
    evaluation and calibration lines whose losses are the eval record's; not one line of
    megatron's Transformer Engine/Apex warnings, which the same import without the pipeline prints."""
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm.out"
    with open(log, "w") as out:
        r = subprocess.run([sys.executable, "-c", NO_WANDB, "train", "--config", str(CONFIG),
                            *overrides(data, run_dir)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                           env=_env(), timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert "Transformer Engine" not in text and "warnings.warn" not in text, text[:2000]

    line = re.compile(rf"^{STAMP} step (\d+)/6 \| loss (\S+) \| ([\d,]+) tok/s \| lr (\S+) \| "
                      r"grad norm retain (\S+) spanish (\S+) \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$")
    seen = {int(m[1]): m for m in map(line.match, text.splitlines()) if m}
    train = {rec["step"]: rec for rec in records(run_dir, "train")}
    assert sorted(seen) == sorted(train) == [2, 4, 6]
    for step, m in seen.items():
        rec = train[step]
        assert m[2] == f"{rec['loss']:.4f}" and m[4] == f"{rec['lr']:.2e}"
        assert (m[5], m[6]) == (f"{rec['grad_norm_retain']:.3g}", f"{rec['grad_norm_forget0']:.3g}")
        assert int(m[3].replace(",", "")) > 0

    ev = {rec["step"]: rec for rec in records(run_dir, "eval")}
    assert sorted(ev) == [4, 6]
    for step, rec in ev.items():
        assert re.search(rf"^{STAMP} eval step {step}: calibration step 8/8: ", text, re.M)
        for name in ("forget", "retain"):
            want = (f"eval step {step}: {name}: 1 batches, [\\d,]+ tokens: full {rec[f'{name}_full']:.4f} "
                    f"ablated {rec[f'{name}_ablated']:.4f} calibrated {rec[f'{name}_calibrated']:.4f}")
            assert re.search(rf"^{STAMP} {want}$", text, re.M), (want, text[-2000:])
        assert re.search(rf"^{STAMP} eval step {step}: done in \d+\.\d s$", text, re.M)

    # Control: the warnings exist and are printed when megatron is imported without the pipeline.
    raw = subprocess.run([sys.executable, "-c", "import megatron.core.optimizer"], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert raw.stderr.count("Transformer Engine and Apex are not installed") >= 2, raw.stderr


def _wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run file: a LevelDB-style log (7-byte header ':W&B' + magic
    + version; 32 KiB blocks of records [crc32, length, type]) of wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # first / middle fragment
            pending += chunk
            continue
        if kind == 0:
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_mirrors_the_metrics_without_network(data, tmp_path, monkeypatch):
    """logging.wandb.enabled in offline mode: the run is written under <run_dir>/wandb with the id
    kept in wandb_run_id, and its history holds every train loss and eval loss of metrics.jsonl."""
    pytest.importorskip("wandb")  # a dev dependency (pyproject's dev extra); optional for users
    from pipeline.config import load_config
    from pipeline.train.loop import train

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "wb"
    cfg = load_config(CONFIG, overrides(data, run_dir, **{"logging.wandb.enabled": "true",
                                                             "logging.wandb.tags": "[test]"}))
    assert cfg.logging.wandb.mode == "offline"
    train(cfg)
    import wandb

    wandb.teardown()  # finish() returns before wandb's service has flushed the run file; exit would flush it
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, list((run_dir / "wandb").iterdir())
    history = _wandb_history(files[0])
    losses = {row["step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert losses == {rec["step"]: rec["loss"] for rec in records(run_dir, "train")}
    evals = {row["step"]: row["eval/retain_calibrated"] for row in history if "eval/retain_calibrated" in row}
    assert evals == {rec["step"]: rec["retain_calibrated"] for rec in records(run_dir, "eval")}


def test_wandb_asked_for_but_absent_is_one_line_before_anything_runs(data, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run_dir = tmp_path / "nowb"
    rc = main(["train", "--config", str(CONFIG), *overrides(data, run_dir), "logging.wandb.enabled=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("sgtm: error: logging.wandb.enabled: true, but the wandb package is not installed")
    assert "pip install 'sgtm-pipeline[wandb]'" in err[0]
    assert not run_dir.exists()
