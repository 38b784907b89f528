"""`sgtm eval-harness`: task files made from held-out documents only, well-formed for the harness,
and lm-evaluation-harness run end to end (offline) on HF exports of a tiny model that knows English
and of the same model untrained: accuracies in [0, 1], the trained one clearly above the other on
English and above its own Spanish accuracy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.data.labels import is_heldout
from pipeline.experiments import harness_tasks as ht
from tests.conftest import ROOT
from tests.support.data import small_bilingual

pytest.importorskip("lm_eval")
CONFIG = ROOT / "configs" / "experiments" / "bilingual_tiny.yaml"
HELDOUT = 0.2  # more held-out stories than the default 5% of the 300-story slice
BATCH = 64


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    data = small_bilingual(tmp_path_factory.mktemp("data"))
    o = {"model.n_layers": 1, "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128,
         "sgtm.strategy": "none", "sgtm.domains": "[{name: spanish, heads: [1], units: 16}]",
         "data.heldout_fraction": HELDOUT, "train.seed": 0, **data}
    return load_config(CONFIG, [f"{k}={v}" for k, v in o.items()])


@pytest.fixture(scope="module")
def docs(cfg):
    return {split: ht.read_documents(cfg.data, split) for split in ("heldout", "train")}


def violations(items: list[dict], heldout: list[ht.Document], train: list[ht.Document]) -> list[str]:
    """What is wrong with items that should come from held-out documents only: an item whose
    document is not held out, whose text (context + true answer) is not in its document, or whose
    text appears in a training document."""
    by_key = {(d.key, d.role): d.text for d in heldout}
    train_text = [d.text for d in train]
    bad = []
    for it in items:
        truth = it["choices"][it["gold"]]
        if not is_heldout(it["doc"], HELDOUT) or (it["doc"], it["role"]) not in by_key:
            bad.append(f"{it['id']}: document not held out")
            continue
        text = by_key[(it["doc"], it["role"])]
        at = text.find(it["context"])
        if at < 0 or not text[at + len(it["context"]):].lstrip().startswith(truth):
            bad.append(f"{it['id']}: context + answer not in its held-out document")
        if any(it["context"] in t for t in train_text) and len(it["context"].split()) >= 24:
            bad.append(f"{it['id']}: a long context also appears in a training document")
    return bad


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**20), max_items=st.integers(1, 60),
       kinds=st.sampled_from([["cloze"], ["continuation"], ["cloze", "continuation"]]))
def test_task_files_are_well_formed_and_come_from_held_out_documents_only(docs, tmp_path_factory, seed, max_items,
                                                                          kinds):
    """Every task: a YAML the harness reads and a JSONL of 4-choice items (distinct choices, gold in
    range, at most max_items) whose documents are held out and hold the item's text; the same
    inputs give byte-identical files (another seed gives other items)."""
    out = tmp_path_factory.mktemp("tasks")
    rec = ht.write_tasks(docs["heldout"], out, kinds, seed, max_items)
    assert {t["kind"] for t in rec["tasks"].values()} == set(kinds)
    assert {t["role"] for t in rec["tasks"].values()} == {"retain", "forget:spanish"}
    for name, t in rec["tasks"].items():
        items = ht.read_items(out / t["file"])
        assert 0 < len(items) == t["items"] <= max_items
        assert all(len({c.lower() for c in it["choices"]}) == ht.CHOICES for it in items)
        assert all(it["role"] == t["role"] for it in items)
        assert violations(items, docs["heldout"], docs["train"]) == []
        yaml_text = (out / f"{name}.yaml").read_text()
        assert f"task: {name}" in yaml_text and str((out / t["file"]).resolve()) in yaml_text
    again = tmp_path_factory.mktemp("again")
    ht.write_tasks(docs["heldout"], again, kinds, seed, max_items)
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in ("tasks.json",)
               ) and all((out / t["file"]).read_bytes() == (again / t["file"]).read_bytes()
                         for t in rec["tasks"].values())


def test_the_held_out_check_catches_items_made_from_training_documents(docs, tmp_path):
    """Mutation: tasks generated from the *training* documents fail the check the property uses."""
    rec = ht.write_tasks(docs["train"], tmp_path, ["cloze", "continuation"], 0, 30)
    items = [it for t in rec["tasks"].values() for it in ht.read_items(tmp_path / t["file"])]
    assert len(violations(items, docs["heldout"], docs["train"])) == len(items)


def test_bad_input_is_one_line_naming_what_was_expected(cfg, docs, tmp_path):
    with pytest.raises(ht.TaskError, match=r"--tasks: unknown task kind 'lambada' \(expected some of cloze"):
        ht.write_tasks(docs["heldout"], tmp_path, ["lambada"])
    with pytest.raises(ht.TaskError, match="--max-items: expected a positive"):
        ht.write_tasks(docs["heldout"], tmp_path, max_items=0)
    with pytest.raises(ht.TaskError, match="no documents to make tasks from"):
        ht.write_tasks([], tmp_path)
    with pytest.raises(ht.TaskError, match="data.heldout_fraction: 0.0 leaves no held-out documents"):
        ht.read_documents(_with_fraction(cfg.data, 0.0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0, "doc": "1", "role": "retain"}\n')
    with pytest.raises(ht.TaskError, match=r"bad.jsonl:1: expected 4 choices"):
        ht.read_items(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ht.TaskError, match=r"bad.jsonl:1: invalid JSON"):
        ht.read_items(bad)
    r = subprocess.run([sys.executable, "-m", "pipeline", "eval-harness", "--hf", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("sgtm: error: ")
    assert "not a HF model directory" in r.stderr and "Traceback" not in r.stderr


def _with_fraction(data_cfg, fraction: float):
    import dataclasses

    return dataclasses.replace(data_cfg, heldout_fraction=fraction)


def _model_dir(cfg, world, out, train_steps: int, train_docs: list[ht.Document]):
    """A model directory (as `sgtm consolidate` writes) of the pipeline's model, trained on English
    training documents for ``train_steps`` steps (0: left at its initialisation)."""
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.engine.engine import build_model
    from pipeline.model.tp_state import gather_full_state_dict
    from pipeline.train.offline import LoadedModel, write_model_dir

    torch.manual_seed(0)
    _, model = build_model(cfg, world)
    if train_steps:
        tok = load_tokenizer(cfg.data.tokenizer)
        ids = [i for d in train_docs if d.role == "retain" for i in tok.encode(d.text) + [tok.eot_id]]
        seq = cfg.model.max_seq_len
        rows = torch.tensor(ids[: len(ids) // (seq + 1) * (seq + 1)]).view(-1, seq + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: more threads only contend on a loaded machine
        model.train()
        try:
            for _ in range(train_steps):
                batch = rows[torch.randint(len(rows), (BATCH,), generator=gen)]
                loss = model(batch[:, :-1], labels=batch[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        model.eval()
    meta = {"step": train_steps, "partition": {"domains": ["spanish"]}, "ablated_domains": []}
    return write_model_dir(LoadedModel(cfg, gather_full_state_dict(model), meta), out)


def test_harness_end_to_end_separates_a_model_that_knows_the_domain(cfg, docs, single_process_world, tmp_path):
    """`sgtm eval-harness --checkpoint MODEL_DIR` (export, tasks, lm-evaluation-harness, offline):
    per task an accuracy in [0, 1] with the harness's stderr; the English-trained model's English
    cloze accuracy is above the untrained model's by more than 3 standard errors and above its own
    Spanish accuracy; the output records the CLI equivalent."""
    from pipeline.experiments.eval_harness import evaluate

    tasks = tmp_path / "tasks"
    res = {}
    for name, steps in (("untrained", 0), ("english", 200)):
        src = _model_dir(cfg, single_process_world, tmp_path / name, steps, docs["train"])
        res[name] = evaluate(checkpoint=src, kinds=["cloze"], seed=0, max_items=150, task_dir=tasks,
                             batch_size=64, out=tmp_path / f"{name}.json", log=lambda *_: None)
        assert json.loads((tmp_path / f"{name}.json").read_text())["tasks"] == res[name]["tasks"]
    for r in res.values():
        assert set(r["tasks"]) == {"sgtm_cloze_retain", "sgtm_cloze_forget_spanish"}
        for t in r["tasks"].values():
            assert 0.0 <= t["acc"] <= 1.0 and t["acc_stderr"] is not None and 0 < t["acc_stderr"] < 0.2
        assert r["model"]["deployed_model"] == "full" and "--include_path" in r["cli_equivalent"]
    en, un = res["english"]["tasks"], res["untrained"]["tasks"]
    gap = en["sgtm_cloze_retain"]["acc"] - un["sgtm_cloze_retain"]["acc"]
    se = (en["sgtm_cloze_retain"]["acc_stderr"] ** 2 + un["sgtm_cloze_retain"]["acc_stderr"] ** 2) ** 0.5
    assert gap > 3 * se, (en, un)
    assert en["sgtm_cloze_retain"]["acc"] > en["sgtm_cloze_forget_spanish"]["acc"] + 2 * se, en
