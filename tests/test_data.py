"""Data layer: tokenizers, shards, tagging, noise simulator, streaming loader, resume, bad inputs.

Everything runs on the bundled corpora in data/ (small subsets where the full set is not needed).
"""

from __future__ import annotations

import json
import lzma
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codes import Mode, TrueLabel
from pipeline.config import ConfigError
from pipeline.data.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.labels import LabelRules, is_heldout
from pipeline.data.loader import _to_torch, build_eval_batches, build_loader, tagging_report
from pipeline.data.shards import iter_shard_documents, iter_shard_samples, load_manifest, write_shards
from pipeline.data.tagging import tag_shards
from pipeline.data.tokenizer import load_gpt2, load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
FIXTURES = Path(__file__).parent / "data_fixtures"
SEQ = 64


def _subset(src: Path, dst: Path, n: int) -> Path:
    with lzma.open(src, "rt", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def gpt2():
    return load_gpt2()


@pytest.fixture(scope="session")
def small(tmp_path_factory, gpt2):
    """400 parallel EN/ES stories and 600 wiki articles, sharded into 6+ small shards per source."""
    root = tmp_path_factory.mktemp("small")
    en = _subset(DATA / "tinystories/stories_en.jsonl.xz", root / "en.jsonl", 400)
    es = _subset(DATA / "tinystories/stories_es.jsonl.xz", root / "es.jsonl", 400)
    wiki = _subset(DATA / "wiki_vital/articles_en.jsonl.xz", root / "wiki.jsonl", 600)
    for name, path in (("en", en), ("es", es), ("wiki", wiki)):
        write_shards([str(path)], gpt2, SEQ, root / name, source=name, shard_size_mb=0.03, progress=False)
    tag_shards(
        str(root / "wiki"),
        "truth",
        str(root / "wiki_tags"),
        gpt2,
        rules=LabelRules.load(str(ROOT / "configs/data/wiki_labels.yaml")),
        progress=False,
    )
    return root


def bilingual_cfg(root: Path, **overrides) -> dict:
    cfg = {
        "sources": [
            {"path": str(root / "en"), "true_label": "retain"},
            {"path": str(root / "es"), "true_label": "forget:spanish"},
        ],
        "domains": ["spanish"],
        "tokenizer": "gpt2",
        "shuffle_buffer": 64,
        "tagging": {"undiscovered_rate": 0.2, "retain_fraction": 0.25},
    }
    cfg.update(overrides)
    return cfg


def all_documents(shard_dir: Path) -> dict[int, np.ndarray]:
    manifest = load_manifest(shard_dir)
    return {d.doc_index: d.tokens for e in manifest["shards"] for d in iter_shard_documents(shard_dir / e["name"], e)}


def reassemble(batches: list[dict]) -> dict[tuple[int, int], list[int]]:
    """(source, doc) -> tokens, from the packed batches (pieces of one doc arrive in order)."""
    docs: dict[tuple[int, int], list[int]] = defaultdict(list)
    for batch in batches:
        ids, doc_ids, src, dix = (batch[k].numpy() for k in ("input_ids", "doc_ids", "source_ids", "doc_index"))
        labels = batch["labels"].numpy()
        for r in range(ids.shape[0]):
            # the row's tokens are input_ids plus the final label (the S+1-th token)
            for seg in np.unique(doc_ids[r]):
                where = np.flatnonzero(doc_ids[r] == seg)
                if src[r, where[0]] < 0:
                    continue
                key = (int(src[r, where[0]]), int(dix[r, where[0]]))
                tokens = ids[r, where].tolist()
                if where[-1] == ids.shape[1] - 1 and labels[r, -1] != -100:
                    tokens.append(int(labels[r, -1]))  # the doc continues into the row's last target
                if key in docs:
                    assert where[0] == 0 and docs[key][-1] == tokens[0]  # continuation repeats one token
                    tokens = tokens[1:]
                docs[key].extend(tokens)
    return docs


# ------------------------------------------------------------------------------------------ tokenizers


def test_gpt2_ids_equal_reference_ids(gpt2):
    """Reference ids were computed once with tiktoken 0.14.0 from the original encoder.json/vocab.bpe."""
    reference = json.loads((FIXTURES / "gpt2_reference_ids.json").read_text(encoding="utf-8"))
    assert len(reference) >= 10
    for text, ids in reference:
        assert gpt2.encode(text) == ids, text
        assert gpt2.decode(ids) == text
    assert (gpt2.eot_id, gpt2.vocab_size) == (50256, 50257)


def test_trained_bpe_roundtrips_and_has_its_own_hash(tmp_path, gpt2):
    en = _subset(DATA / "tinystories/stories_en.jsonl.xz", tmp_path / "en.jsonl", 300)
    texts = [json.loads(line)["text"] for line in en.read_text().splitlines()]
    tok = train_bpe(texts, 1024, tmp_path / "tok.json")
    assert tok.vocab_size == 1024 and tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # it actually merges
    again = load_tokenizer(str(tmp_path / "tok.json"))
    assert again.hash == tok.hash != gpt2.hash
    assert again.encode(texts[1]) == tok.encode(texts[1])


# ------------------------------------------------------------------------------------------ sharding


def test_all_input_formats_give_the_same_shards(tmp_path, gpt2):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first document\nwith two lines", "second one", "third: ¿qué tal? 😀"]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (tmp_path / "a.txt").write_text("\n<|endoftext|>\n".join(texts) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "a_ds"))
    results = []
    for name in ("a.jsonl", "a.txt", "a.parquet", "a_ds"):
        out = tmp_path / f"out_{name.replace('.', '_')}"
        write_shards([str(tmp_path / name)], gpt2, 8, out, source="a", progress=False)
        results.append([d.tokens.tolist() for d in iter_shard_documents(out / "a-00000.tar")])
    expected = [gpt2.encode(t) + [gpt2.eot_id] for t in texts]
    assert all(r == expected for r in results)


def test_shard_samples_are_packed_sequences_with_boundaries(small, gpt2):
    manifest = load_manifest(small / "en")
    assert manifest["tokenizer"]["hash"] == gpt2.hash and manifest["dtype"] == "uint16"
    assert len(manifest["shards"]) >= 4
    entry = manifest["shards"][0]
    samples = list(iter_shard_samples(small / "en" / entry["name"]))
    assert len(samples) == entry["samples"]
    assert all(len(t) == SEQ + 1 and t.dtype == np.uint16 for _, t, _ in samples[:-1])
    lengths: dict[int, int] = {}
    ended = 0
    for _, tokens, meta in samples:
        b = meta["boundaries"]
        assert b[0] == 0 and b[-1] == len(tokens) and meta["source"] == "en"
        lengths.update({int(d): info["n_tokens"] for d, info in meta["docs"].items()})
        for (doc, offset, n), start, end in zip(meta["pieces"], b[:-1], b[1:], strict=True):
            assert end - start == n and offset + n <= lengths[doc]
            is_end = offset + n == lengths[doc]
            assert (tokens[start:end] == gpt2.eot_id).sum() == int(is_end)  # eot only where a document ends
            assert tokens[end - 1] == gpt2.eot_id or not is_end
            ended += is_end
    assert ended == entry["docs"]
    # document ids are consecutive across shards in input order
    firsts = [e["first_doc"] for e in manifest["shards"]]
    assert firsts == list(np.cumsum([0] + [e["docs"] for e in manifest["shards"][:-1]]))


def test_sharding_restarts_after_a_crash(tmp_path, gpt2):
    src = _subset(DATA / "tinystories/stories_en.jsonl.xz", tmp_path / "en.jsonl", 120)
    clean = write_shards([str(src)], gpt2, SEQ, tmp_path / "clean", source="en", shard_size_mb=0.02, progress=False)
    out = tmp_path / "crashed"
    write_shards([str(src)], gpt2, SEQ, out, source="en", shard_size_mb=0.02, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3
    # a crash while writing shard 2: manifest lists 2 shards, a temp file and a stale later shard remain
    (out / manifest["shards"][2]["name"]).rename(out / f".{manifest['shards'][2]['name']}.tmp")
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    resumed = write_shards([str(src)], gpt2, SEQ, out, source="en", shard_size_mb=0.02, progress=False)
    assert [e["sha256"] for e in resumed["shards"]] == [e["sha256"] for e in clean["shards"]]
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(DataError, match="different"):
        write_shards([str(src)], gpt2, SEQ + 1, out, source="en", shard_size_mb=0.02, progress=False)


# ------------------------------------------------------------------------------------------ loader


def test_round_trip_two_ranks_two_workers_one_epoch(small):
    """Every training document comes back exactly once, token for token, with right labels and modes."""
    cfg = bilingual_cfg(small, epochs=1, num_workers=2, heldout_fraction=0.1)
    batches = []
    for rank in (0, 1):
        batches += list(build_loader(cfg, dp_rank=rank, dp_world_size=2, seed=3, micro_batch_size=4, seq_len=SEQ))
    got = reassemble(batches)
    for source_id, name in enumerate(("en", "es")):
        manifest = load_manifest(small / name)
        keys = {d.doc_index: d.key for e in manifest["shards"] for d in iter_shard_documents(small / name / e["name"])}
        expected = {i: t for i, t in all_documents(small / name).items() if not is_heldout(keys[i], 0.1)}
        assert 0 < len(expected) < len(keys)
        mine = {doc: toks for (s, doc), toks in got.items() if s == source_id}
        assert set(mine) == set(expected)  # none missing, none from the held-out split
        for doc, tokens in expected.items():
            assert mine[doc] == tokens.tolist()  # exact tokens, no duplicate pieces
    for batch in batches:
        ids, labels, seg, src = batch["input_ids"], batch["labels"], batch["doc_ids"], batch["source_ids"]
        same = (seg[:, 1:] == seg[:, :-1]) & (src[:, 1:] >= 0)
        assert torch.equal(labels[:, :-1][same], ids[:, 1:][same])  # next-token targets inside a doc
        assert (labels[:, :-1][~same] == -100).all()  # no target across a document boundary
        assert (labels[ids == 50256] == -100).all()  # eot ends its document: nothing to predict after it
        true, modes = batch["true_labels"], batch["modes"]
        assert ((true == TrueLabel.RETAIN) == (src == 0)).all() and ((true == TrueLabel.FORGET) == (src == 1)).all()
        assert (modes[src == 0] != Mode.FORGET).all() and (modes[src == 1] != Mode.RETAIN).all()
        assert (labels[true == TrueLabel.PAD] == -100).all()
        assert batch["input_ids"].dtype == torch.int64 and batch["modes"].dtype == torch.int64


def test_exact_resume_matches_uninterrupted_run(small):
    for workers, k in ((2, 7), (0, 4)):
        cfg = bilingual_cfg(small, num_workers=workers)
        reference = build_loader(cfg, seed=5, micro_batch_size=3, seq_len=SEQ)
        expected = [next(reference) for _ in range(k + 6)]
        reference.close()
        first = build_loader(cfg, seed=5, micro_batch_size=3, seq_len=SEQ)
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        first.close()
        resumed = build_loader(cfg, seed=5, micro_batch_size=3, seq_len=SEQ)
        resumed.load_state_dict(state)
        for want in expected[k:]:
            got = next(resumed)
            assert all(torch.equal(want[key], got[key]) for key in want)
        resumed.close()
    other = build_loader(bilingual_cfg(small, num_workers=0, filter="weak"), seed=5, micro_batch_size=3, seq_len=SEQ)
    with pytest.raises(DataError, match="different data config"):
        other.load_state_dict(state)


def test_tp_ranks_get_identical_batches_and_dp_ranks_disjoint_documents(small):
    cfg = bilingual_cfg(small, num_workers=0)

    def take(rank: int) -> list[dict]:
        loader = build_loader(cfg, dp_rank=rank, dp_world_size=2, seed=1, micro_batch_size=4, seq_len=SEQ)
        return [next(loader) for _ in range(5)]

    a, b, c = take(0), take(0), take(1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    docs = lambda bs: {
        (int(s), int(d)) for x in bs for s, d in zip(x["source_ids"].flatten(), x["doc_index"].flatten(), strict=True)
    }
    assert not (docs(a) & docs(c))


def test_filter_policies_and_mixing_weights(small):
    def run(n: int = 40, **overrides) -> list[dict]:
        loader = build_loader(bilingual_cfg(small, **overrides), seed=0, micro_batch_size=8, seq_len=SEQ)
        return [next(loader) for _ in range(n)]

    weak = run(filter="weak")
    for b in weak:
        assert (b["modes"] < Mode.FORGET).all()
        assert ((b["true_labels"] == TrueLabel.FORGET) & (b["modes"] != Mode.UNLABELLED)).sum() == 0  # missed ES only
    spanish = sum(int((b["true_labels"] == TrueLabel.FORGET).sum()) for b in weak)
    english = sum(int((b["true_labels"] == TrueLabel.RETAIN).sum()) for b in weak)
    # 1:1 mix before filtering, then 80% of Spanish dropped: ~0.2 Spanish per English token
    assert 0.1 < spanish / english < 0.35
    mixed = run(
        n=250,
        sources=[
            {"path": str(small / "en"), "true_label": "retain", "weight": 3.0},
            {"path": str(small / "es"), "true_label": "forget:spanish", "weight": 1.0},
        ],
    )
    en_share = sum(int((b["source_ids"] == 0).sum()) for b in mixed) / sum(b["source_ids"].numel() for b in mixed)
    assert 0.70 < en_share < 0.80  # ~600 documents drawn: 0.75 +- 0.02
    wiki = {
        "sources": [{"path": str(small / "wiki"), "tags": str(small / "wiki_tags")}],
        "domains": ["biology"],
        "filter": "strict",
        "shuffle_buffer": 16,
    }
    loader = build_loader(wiki, seed=0, micro_batch_size=8, seq_len=SEQ)
    strict = [next(loader) for _ in range(30)]
    assert all(((b["true_labels"] == TrueLabel.ADJACENT) | (b["true_labels"] == TrueLabel.FORGET)).sum() == 0
               for b in strict)
    loader = build_loader({**wiki, "filter": "none"}, seed=0, micro_batch_size=8, seq_len=SEQ)
    unfiltered = [next(loader) for _ in range(30)]
    assert sum(int((b["true_labels"] == TrueLabel.ADJACENT).sum()) for b in unfiltered) > 0


def test_perfect_filter_drops_every_true_forget_document_whatever_the_classifier_said(small, tmp_path):
    """`perfect_filter` of configs/sweeps/tradeoff_wiki.yaml is the weak filter on the tag sidecars'
    TRUE labels (noise simulator at 0% undiscovered), not on the classifier's probabilities: with a
    classifier that calls every document retain, the weak filter on its tags keeps biology, the
    perfect filter keeps none of it and still keeps retain and adjacent text."""
    tags = tmp_path / "blind_tags"
    shutil.copytree(small / "wiki_tags", tags)
    for f in tags.glob("*.tags.jsonl"):
        head, *docs = f.read_text().splitlines()
        f.write_text("\n".join([head] + [json.dumps({**json.loads(d), "probs": {"retain": 1.0}}) for d in docs]) + "\n")
    base = {"sources": [{"path": str(small / "wiki"), "tags": str(tags)}], "domains": ["biology"], "filter": "weak",
            "shuffle_buffer": 16}

    def tokens(**tagging) -> dict[int, int]:
        loader = build_loader({**base, "tagging": tagging}, seed=0, micro_batch_size=8, seq_len=SEQ)
        batches = [next(loader) for _ in range(30)]
        return {c: sum(int((b["true_labels"] == c).sum()) for b in batches)
                for c in (TrueLabel.FORGET, TrueLabel.RETAIN, TrueLabel.ADJACENT)}

    blind = tokens(source="classifier")
    perfect = tokens(source="simulated", undiscovered_rate=0.0)
    assert blind[TrueLabel.FORGET] > 0
    assert perfect[TrueLabel.FORGET] == 0
    assert perfect[TrueLabel.RETAIN] > 0 and perfect[TrueLabel.ADJACENT] > 0


def test_noise_simulator_hits_configured_recall_and_precision(tmp_path, gpt2):
    """On the full bundled bilingual set: recall = 1 - undiscovered, precision and retain fraction as set."""
    for name in ("en", "es"):
        write_shards(
            [str(DATA / f"tinystories/stories_{name}.jsonl.xz")],
            gpt2,
            256,
            tmp_path / name,
            source=name,
            progress=False,
        )
    cfg = bilingual_cfg(
        tmp_path, tagging={"undiscovered_rate": 0.2, "precision": 0.9, "retain_fraction": 0.25, "seed": 7}
    )
    table = tagging_report(cfg).to_dict()
    docs = lambda role, mode: table.get(role, {}).get(mode, {}).get("docs", 0)
    n_forget = sum(c["docs"] for c in table["forget:spanish"].values())
    n_other = sum(c["docs"] for c in table["retain"].values())
    tp, fp = docs("forget:spanish", "forget:spanish"), docs("retain", "forget:spanish")
    recall, precision = tp / n_forget, tp / (tp + fp)
    assert abs(recall - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n_forget)
    assert abs(precision - 0.9) < 0.03
    retain_share = docs("retain", "retain") / (n_other - fp)
    assert abs(retain_share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n_other)
    assert docs("forget:spanish", "retain") == 0  # a missed forget doc is never put in retain mode


def test_wiki_classifier_f1_and_tagging_via_cli(tmp_path, small, capsys):
    from pipeline.cli import main

    out = tmp_path / "wiki.npz"
    assert (
        main(
            [
                "data",
                "train-classifier",
                "--input",
                str(DATA / "wiki_vital/articles_en.jsonl.xz"),
                "--labels",
                str(ROOT / "configs/data/wiki_labels.yaml"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.with_suffix(".report.json").read_text())
    biology = report["classes"]["forget:biology"]
    print(report)
    assert biology["f1"] >= 0.7 and biology["precision"] >= 0.7 and biology["recall"] >= 0.7
    assert biology["support"] >= 40 and report["heldout_docs"] > 400
    assert "forget:biology" in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "tag",
                "--shards",
                str(small / "wiki"),
                "--classifier",
                str(out),
                "--out",
                str(tmp_path / "tags"),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "true label" in printed and "forget:biology" in printed
    summary = json.loads((tmp_path / "tags/tags.json").read_text())
    bio_row = summary["confusion"]["forget:biology"]
    assert bio_row["forget:biology"]["docs"] > 0.6 * sum(c["docs"] for c in bio_row.values())
    first = load_manifest(small / "wiki")["shards"][0]["name"]
    records = [json.loads(line) for line in (tmp_path / f"tags/{first}.tags.jsonl").read_text().splitlines()[1:]]
    assert all(0 <= r["confidence"] <= 1 and r["label"] in r["probs"] for r in records)
    cfg = {
        "sources": [{"path": str(small / "wiki"), "tags": str(tmp_path / "tags")}],
        "domains": ["biology"],
        "tagging": {"source": "classifier", "forget_threshold": 0.6},
        "num_workers": 0,
    }
    loader = build_loader(cfg, micro_batch_size=8, seq_len=SEQ)
    batches = [next(loader) for _ in range(40)]
    forget_tokens = torch.cat([b["true_labels"][b["modes"] == Mode.FORGET] for b in batches])
    assert len(forget_tokens) > 0 and (forget_tokens == TrueLabel.FORGET).float().mean() > 0.6  # precision
    true_bio = torch.cat([b["modes"][b["true_labels"] == TrueLabel.FORGET] for b in batches])
    assert (true_bio == Mode.FORGET).float().mean() > 0.6  # recall, token-weighted


def test_language_id_and_paragraph_spans_give_per_token_modes(tmp_path, gpt2):
    """A document with an English and a Spanish paragraph: paragraph granularity labels them apart."""
    from pipeline.data.classifier import train_classifier
    from pipeline.data.readers import iter_documents

    rules = LabelRules.load(str(ROOT / "configs/data/tinystories_labels.yaml"))
    docs = list(
        iter_documents([str(DATA / "tinystories/stories_en.jsonl.xz"), str(DATA / "tinystories/stories_es.jsonl.xz")])
    )
    clf, report = train_classifier(docs, rules, "chars", train_fraction=0.05)
    assert report["accuracy"] >= 0.98 and report["heldout_docs"] > 400
    clf.save(tmp_path / "lang.npz")
    en = [d.text for d in docs if d.meta["lang"] == "en"][:30]
    es = [d.text for d in docs if d.meta["lang"] == "es"][:30]
    mixed = [
        {"id": f"m{i}", "lang": "mixed", "text": a.split("\n\n")[0] + "\n\n" + b.split("\n\n")[0]}
        for i, (a, b) in enumerate(zip(en, es, strict=True))
    ]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(m) + "\n" for m in mixed))
    write_shards([str(tmp_path / "mixed.jsonl")], gpt2, SEQ, tmp_path / "mixed", source="mixed", progress=False)
    tag_shards(str(tmp_path / "mixed"), str(tmp_path / "lang.npz"), str(tmp_path / "tags"), gpt2, progress=False)
    cfg = {
        "sources": [{"path": str(tmp_path / "mixed"), "tags": str(tmp_path / "tags")}],
        "domains": ["spanish"],
        "heldout_fraction": 0.0,
        "epochs": 1,
        "tagging": {"source": "classifier", "granularity": "paragraph", "retain_fraction": 1.0},
    }
    checked = 0
    newline = gpt2.encode("\n")[0]
    for batch in build_loader(cfg, micro_batch_size=4, seq_len=512):
        for ids, modes, segs in zip(batch["input_ids"], batch["modes"], batch["doc_ids"], strict=True):
            for seg in segs.unique():
                tokens, seg_modes = ids[segs == seg].tolist(), modes[segs == seg]
                breaks = [i for i in range(len(tokens) - 1) if tokens[i] == tokens[i + 1] == newline]
                if len(breaks) != 1:
                    continue  # a piece cut at a row end that holds only one of the paragraphs
                b = breaks[0]
                assert (seg_modes[:b] == Mode.RETAIN).all() and (seg_modes[b + 2 :] == Mode.FORGET).all()
                checked += 1
    assert checked >= 20
    # document granularity: one mode for the whole mixed document
    cfg["tagging"]["granularity"] = "document"
    for batch in build_loader(cfg, micro_batch_size=4, seq_len=512):
        for modes, segs in zip(batch["modes"], batch["doc_ids"], strict=True):
            assert all(len(modes[segs == seg].unique()) == 1 for seg in segs.unique())


def test_eval_batches_are_held_out_and_fixed(small):
    cfg = bilingual_cfg(small, heldout_fraction=0.1)
    forget = build_eval_batches(cfg, "forget", seq_len=SEQ, batch_size=4)
    retain = build_eval_batches(cfg, "retain", seq_len=SEQ, batch_size=4)
    again = build_eval_batches(cfg, "forget", seq_len=SEQ, batch_size=4)
    assert forget and retain and len(forget) == len(again)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(forget, again, strict=True) for k in a)
    assert all(set(b["true_labels"].unique().tolist()) <= {TrueLabel.FORGET, TrueLabel.PAD} for b in forget)
    assert all((b["modes"] == Mode.UNLABELLED).all() for b in forget)
    held = {
        (int(s), int(d))
        for b in forget + retain
        for s, d in zip(b["source_ids"].flatten(), b["doc_index"].flatten(), strict=True)
        if s >= 0
    }
    loader = build_loader(bilingual_cfg(small, heldout_fraction=0.1, epochs=1), micro_batch_size=8, seq_len=SEQ)
    trained = {
        (int(s), int(d))
        for b in loader
        for s, d in zip(b["source_ids"].flatten(), b["doc_index"].flatten(), strict=True)
        if s >= 0
    }
    assert held and trained and not (held & trained)
    # the parallel corpus splits by story id: held-out English and Spanish are the same stories
    assert {d for s, d in held if s == 0} == {d for s, d in held if s == 1}


# ------------------------------------------------------------------------------------------ bad inputs


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_truncated_shard_fails_with_one_line_or_is_skipped(small, tmp_path):
    copy = tmp_path / "en"
    shutil.copytree(small / "en", copy)
    victim = load_manifest(copy)["shards"][1]["name"]
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        list(iter_shard_documents(copy / victim))
    assert victim in _one_line(info.value) and "truncated" in str(info.value)
    cfg = bilingual_cfg(small, epochs=1)
    cfg["sources"][0]["path"] = str(copy)
    with pytest.raises(DataError) as info:
        list(build_loader(cfg, micro_batch_size=4, seq_len=SEQ))
    assert victim in _one_line(info.value)
    with pytest.raises(DataError) as info:  # same through DataLoader worker processes
        list(build_loader({**cfg, "num_workers": 2}, micro_batch_size=4, seq_len=SEQ))
    assert victim in _one_line(info.value)
    loader = build_loader({**cfg, "skip_bad_shards": True}, micro_batch_size=4, seq_len=SEQ)
    assert len(list(loader)) > 0
    assert len(loader.state_dict()["skipped_shards"]) == 1 and victim in loader.skipped_shards[0]


def test_unsafe_tar_member_names_are_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        payload = tmp_path / "x"
        payload.write_bytes(b"{}")
        tar.add(payload, arcname="../../etc/000.meta.json")
    with pytest.raises(DataError, match="unsafe tar member"):
        list(iter_shard_samples(path))


def test_wrong_tokenizer_hash_names_the_manifest(small, tmp_path):
    train_bpe(["some text to train on"] * 20, 300, tmp_path / "tok.json")
    with pytest.raises(DataError) as info:
        build_loader(bilingual_cfg(small, tokenizer=str(tmp_path / "tok.json")), micro_batch_size=2, seq_len=SEQ)
    assert "manifest.json" in _one_line(info.value) and "tokenizer hash" in str(info.value)


def test_tags_that_do_not_match_their_shard(small, tmp_path):
    tags = tmp_path / "tags"
    shutil.copytree(small / "wiki_tags", tags)
    sidecar = sorted(tags.glob("*.tags.jsonl"))[0]
    lines = sidecar.read_text().splitlines()
    header = json.loads(lines[0])
    header["sha256"] = "0" * 64
    sidecar.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    cfg = {"sources": [{"path": str(small / "wiki"), "tags": str(tags)}], "domains": ["biology"], "epochs": 1}
    with pytest.raises(DataError) as info:
        list(build_loader(cfg, micro_batch_size=4, seq_len=SEQ))
    assert sidecar.name in _one_line(info.value) and "do not match" in str(info.value)


def test_cli_bad_inputs_give_one_line_errors(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "data.xyz").write_text("hello")
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [
        (["--input", str(tmp_path / "data.xyz")], "unknown input type"),
        (["--input", str(tmp_path / "empty.jsonl")], "no documents"),
        (["--input", str(tmp_path / "missing.jsonl")], "no such file"),
    ]
    for args, message in cases:
        rc = main(["data", "shard", *args, "--seq-len", "8", "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_config_errors_name_the_key():
    base = {"sources": [{"path": "x"}], "domains": ["spanish"]}
    cases = [
        (
            {**base, "sources": [{"path": "x", "weight": -1}]},
            "data.sources[0].weight: expected a positive number",
        ),
        ({**base, "filter": "medium"}, "data.filter: expected one of"),
        ({**base, "tagging": {"undiscovered_rate": 1.5}}, "data.tagging.undiscovered_rate"),
        ({**base, "sources": [{"path": "x", "true_label": "forget:bio"}]}, "data.sources[0].true_label"),
        ({**base, "tagging": {"source": "classifier"}}, "data.sources[0].tags: required"),
        ({**base, "sauces": []}, "data.sauces: unknown key"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError) as info:
            DataConfig.from_dict(raw)
        assert _one_line(info.value).startswith(message.split(":")[0]) and message in str(info.value)


def test_demo_data_prepares_quickly_and_example_configs_validate(tmp_path):
    import time

    import yaml

    from pipeline.data.prepare import prepare_bilingual

    started = time.perf_counter()
    cfg = prepare_bilingual(tmp_path, seq_len=128)
    assert time.perf_counter() - started < 60
    assert load_tokenizer(cfg["tokenizer"]).vocab_size == 4096
    batch = next(build_loader(cfg, micro_batch_size=4, seq_len=128))
    assert batch["input_ids"].max() < 4096 and batch["input_ids"].shape == (4, 128)
    for name in ("tinystories.yaml", "wiki.yaml"):
        DataConfig.from_dict(yaml.safe_load((ROOT / "configs/data" / name).read_text()))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=25),
    seq_len=st.integers(min_value=1, max_value=33),
    batch_size=st.integers(min_value=1, max_value=4),
)
def test_packing_predicts_every_in_document_token_exactly_once(lengths, seq_len, batch_size):
    """For any document lengths and row length: each (context token -> next token) pair of a document
    is a training target exactly once, never across documents, and modes follow their document."""
    from pipeline.data.loader import _collate, _Doc, pack_rows

    pad = 999
    docs, next_token = [], 0
    for i, n in enumerate(lengths):
        docs.append(_Doc(np.arange(next_token, next_token + n), i % 3, 0, 0, i))
        next_token += n
    rows = list(pack_rows(iter(docs), seq_len, pad))
    pairs = []
    for start in range(0, len(rows), batch_size):
        batch = _collate(rows[start : start + batch_size])
        ids, labels, modes, dix = batch["input_ids"], batch["labels"], batch["modes"], batch["doc_index"]
        assert ids.shape[1] == seq_len
        keep = labels != -100
        pairs += list(zip(ids[keep].tolist(), labels[keep].tolist(), strict=True))
        valid = dix >= 0
        assert (modes[valid] == dix[valid] % 3).all()
    expected = [(t, t + 1) for d in docs for t in d.tokens[:-1].tolist()]
    assert sorted(pairs) == expected


def test_exact_resume_in_a_finite_run_after_one_worker_finished(tmp_path, gpt2):
    """Resume past the point where one DataLoader worker has run out: same tail, same end."""
    src = _subset(DATA / "tinystories/stories_en.jsonl.xz", tmp_path / "en.jsonl", 12)
    manifest = write_shards([str(src)], gpt2, SEQ, tmp_path / "en", source="en", shard_size_mb=0.03, progress=False)
    assert len(manifest["shards"]) == 3  # dealt 2 + 1 to two workers: one runs out first
    cfg = {
        "sources": [{"path": str(tmp_path / "en"), "true_label": "retain"}],
        "domains": ["spanish"],
        "num_workers": 2,
        "epochs": 1,
        "heldout_fraction": 0.0,
        "shuffle_buffer": 4,
    }
    full = list(build_loader(cfg, seed=2, micro_batch_size=1, seq_len=SEQ))
    first = build_loader(cfg, seed=2, micro_batch_size=1, seq_len=SEQ)
    k = 0
    while not any(first.state_dict()["done"]):
        next(first)
        k += 1
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert sum(state["delivered"]) == k < len(full) - 1  # one worker finished, the other has more
    resumed = build_loader(cfg, seed=2, micro_batch_size=1, seq_len=SEQ)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(tail) == len(full) - k
    assert all(torch.equal(a[key], b[key]) for a, b in zip(full[k:], tail, strict=True) for key in a)


# ------------------------------------------------------------------ paragraph granularity (issue 20)


def test_simulated_paragraph_tags_mix_modes_inside_documents_at_the_document_rates():
    """granularity: paragraph with the simulated source gives every paragraph its own noise draw at
    the document rates (it used to be ignored: one mode per document); one paragraph = its document."""
    from pipeline.config import TaggingConfig
    from pipeline.data.tagging import ModeAssigner

    tagging = TaggingConfig(granularity="paragraph", undiscovered_rate=0.3, false_positive_rate=0.2,
                            retain_fraction=0.5)
    assigner = ModeAssigner(tagging, ["bio"])
    paragraphs = [(0, 3), (3, 7), (7, 8), (8, 12)]
    forget = [assigner.assign(f"s:{i}", "forget:bio", None, paragraphs) for i in range(1500)]
    other = [assigner.assign(f"s:{i}", "retain", None, paragraphs) for i in range(1500)]
    found = np.array([m >= Mode.FORGET for d in forget for _, _, m, _ in d.spans])
    false_pos = np.array([m >= Mode.FORGET for d in other for _, _, m, _ in d.spans])
    assert abs(found.mean() - 0.7) < 0.03 and abs(false_pos.mean() - 0.2) < 0.03
    mixed = sum(len({m for _, _, m, _ in d.spans}) > 1 for d in forget + other)
    assert mixed > 1500  # most documents hold paragraphs of different modes
    assert all(sorted({m for _, _, m, _ in d.spans} - {Mode.FORGET}) in ([], [Mode.UNLABELLED]) for d in forget)
    single = assigner.assign("s:0", "forget:bio", None, [(0, 12)])
    assert single.spans is None and single == assigner.assign("s:0", "forget:bio", None)
    document = ModeAssigner(TaggingConfig(undiscovered_rate=0.3), ["bio"]).assign("s:0", "forget:bio", None, paragraphs)
    assert document.spans is None


def _pairs(batches: list[dict]) -> Counter:
    """(source, document, input token, target token) of every training target in the batches."""
    out: Counter = Counter()
    for b in batches:
        keep = b["labels"] != -100
        out.update(zip(b["source_ids"][keep].tolist(), b["doc_index"][keep].tolist(),
                       b["input_ids"][keep].tolist(), b["labels"][keep].tolist(), strict=True))
    return out


def _kept_pairs(source: int, doc: int, tokens: np.ndarray, kept: np.ndarray) -> Counter:
    """The targets a document gives when only `kept` tokens train: pairs of neighbours both kept."""
    both = np.flatnonzero(kept[:-1] & kept[1:])
    return Counter((source, doc, int(tokens[i]), int(tokens[i + 1])) for i in both)


def test_simulated_paragraph_tags_reach_the_loader_and_the_weak_filter_drops_exactly_those_spans(small, gpt2):
    """On real shards (multi-paragraph TinyStories): paragraph-granularity simulated tags give
    mixed modes inside documents, and the weak filter trains on exactly each document's
    non-forget-tagged tokens: forget paragraphs inside retain documents go, retain paragraphs of
    forget documents stay, and no pair across a dropped span becomes a target."""
    from pipeline.data.loader import build_plan
    from pipeline.data.tagging import ModeAssigner, newline_tables, paragraph_spans

    tagging = {"granularity": "paragraph", "undiscovered_rate": 0.3, "false_positive_rate": 0.2,
               "retain_fraction": 0.5}
    cfg = bilingual_cfg(small, tagging=tagging, heldout_fraction=0.0, epochs=1, shuffle_buffer=16)
    unfiltered = list(build_loader(cfg, micro_batch_size=8, seq_len=SEQ))
    mixed = sum(len(b["modes"][r][b["doc_ids"][r] == seg].unique()) > 1
                for b in unfiltered for r in range(len(b["modes"])) for seg in b["doc_ids"][r].unique())
    assert mixed > 50
    by_document = list(build_loader({**cfg, "tagging": {**tagging, "granularity": "document"}},
                                    micro_batch_size=8, seq_len=SEQ))
    assert all(len(b["modes"][r][b["doc_ids"][r] == seg].unique()) == 1
               for b in by_document for r in range(len(b["modes"])) for seg in b["doc_ids"][r].unique())

    weak = list(build_loader({**cfg, "filter": "weak"}, micro_batch_size=8, seq_len=SEQ))
    plan = build_plan(DataConfig.from_dict({**cfg, "filter": "weak"}))
    assigner = ModeAssigner(plan.cfg.tagging, plan.cfg.domains, plan.false_positive_rate)
    newlines = newline_tables(gpt2)
    expected: Counter = Counter()
    partial_retain = 0
    for source, (name, role) in enumerate((("en", "retain"), ("es", "forget:spanish"))):
        for index, tokens in all_documents(small / name).items():
            modes = assigner.assign(f"{name}:{index}", role, None, paragraph_spans(tokens, newlines))
            kept = np.ones(len(tokens), bool)
            if modes.spans:
                for s, e, mode, _ in modes.spans:
                    kept[s:e] = mode < Mode.FORGET
            elif modes.mode >= Mode.FORGET:
                kept[:] = False
            partial_retain += role == "retain" and 0 < kept.sum() < len(kept)
            expected += _kept_pairs(source, index, tokens, kept)
    assert partial_retain > 20  # forget paragraphs inside retain documents were there to drop
    assert _pairs(weak) == expected
    assert all((b["modes"][b["source_ids"] >= 0] < Mode.FORGET).all() for b in weak)


@st.composite
def tagged_documents(draw) -> list[tuple[list[int], dict]]:
    """Documents of 1-5 paragraphs, each with a classifier label and confidence; multi-paragraph
    documents also get a document-level prediction of their own (forget paragraphs in retain or
    unsure documents, retain paragraphs in forget documents). Token ids are unique."""
    labels = st.sampled_from(["retain", "forget:bio", "adjacent"])
    docs, next_token = [], 0
    for _ in range(draw(st.integers(1, 6))):
        paras = draw(st.lists(st.tuples(st.integers(1, 7), labels, st.sampled_from([0.3, 0.9])), min_size=1,
                              max_size=5))
        spans, start = [], 0
        for length, label, conf in paras:
            spans.append([start, start + length, label, conf])
            start += length
        if len(spans) == 1:
            probs = {spans[0][2]: spans[0][3]}
        else:
            probs = {draw(labels): draw(st.sampled_from([0.3, 0.9]))}
        tag = {"true": "retain", "probs": probs, "spans": spans if len(spans) > 1 else []}
        docs.append((list(range(next_token, next_token + start)), tag))
        next_token += start
    return docs


def _tagged_spans_kept(tokens: list[int], tag: dict, policy: str) -> np.ndarray:
    """What SGTM trains non-forget parameters on, per token: not forget-tagged (strict: nor adjacent)."""
    spans = tag["spans"] or [[0, len(tokens), *next(iter(tag["probs"].items()))]]
    kept = np.ones(len(tokens), bool)
    for s, e, label, conf in spans:
        if conf >= 0.5 and (label == "forget:bio" or (policy == "strict" and label == "adjacent")):
            kept[s:e] = False
    return kept


def _check_filter(policy: str, docs: list[tuple[list[int], dict]], seq_len: int, batch_size: int) -> None:
    """Run the loader's own document path (`_make_doc`: tags -> modes -> filter) and packer on the
    documents and compare the training targets with the spans SGTM masks."""
    from pipeline.data.loader import _Plan, _SlotStream, _SourcePlan
    from pipeline.data.shards import ShardDocument

    cfg = DataConfig.from_dict({"sources": [{"path": "unused", "tags": "unused"}], "domains": ["bio"],
                                "filter": policy, "heldout_fraction": 0.0,
                                "tagging": {"source": "classifier", "granularity": "paragraph"}})
    src = _SourcePlan("s", "unused", [], 1.0, 1.0, "unused", None)
    stream = _SlotStream(_Plan(cfg, [src], 10**9, 0.0), 0, 1, 0, seq_len, batch_size)
    tags = {i: tag for i, (_, tag) in enumerate(docs)}
    made = [stream._make_doc(0, src, ShardDocument(i, f"k{i}", {}, np.array(tokens)), tags)
            for i, (tokens, _) in enumerate(docs)]
    batches = [_to_torch(b) for b in stream.batches(iter([d for d in made if d is not None]))]
    expected: Counter = Counter()
    dropped: set[int] = set()
    for i, (tokens, tag) in enumerate(docs):
        kept = _tagged_spans_kept(tokens, tag, policy)
        expected += _kept_pairs(0, i, np.array(tokens), kept)
        dropped |= {t for t, k in zip(tokens, kept, strict=True) if not k}
    for b in batches:
        seen = set(b["input_ids"][b["source_ids"] >= 0].tolist()) | set(b["labels"][b["labels"] != -100].tolist())
        assert not seen & dropped, f"{policy} filter trained on tagged tokens {sorted(seen & dropped)}"
    assert _pairs(batches) == expected


def _filter_property(policy: str):
    @settings(max_examples=80, deadline=None, database=None, report_multiple_bugs=False)
    @given(docs=tagged_documents(), seq_len=st.integers(2, 12), batch_size=st.integers(1, 3))
    def prop(docs, seq_len, batch_size):
        _check_filter(policy, docs, seq_len, batch_size)

    return prop


@pytest.mark.parametrize("policy", ["weak", "strict"])
def test_paragraph_filters_drop_exactly_the_spans_sgtm_masks(policy):
    """Hypothesis over random documents with random paragraph tags: a weak filter at paragraph
    granularity never puts a forget-tagged token into a batch (strict: nor an adjacent-tagged one),
    and every other in-document pair is a target exactly once."""
    _filter_property(policy)()


def test_document_level_dropping_makes_the_filter_property_fail(monkeypatch):
    """The mutation: the filter drops whole documents by their document mode (the old behaviour);
    the property must catch the forget paragraphs it lets through."""
    from pipeline.data import loader

    def by_document(tokens, modes, policy):
        if policy != "none" and (modes.mode >= Mode.FORGET or (policy == "strict" and modes.adjacent)):
            return None
        if not modes.spans:
            return tokens, modes.mode, None
        token_modes = np.full(len(tokens), modes.mode, dtype=np.int64)
        for start, end, mode, _ in modes.spans:
            token_modes[start:end] = mode
        return tokens, token_modes, None

    monkeypatch.setattr(loader, "apply_filter", by_document)
    with pytest.raises(AssertionError):
        _filter_property("weak")()
    spans = [[0, 3, "retain", 0.9], [3, 6, "forget:bio", 0.9]]
    retain_doc = [(list(range(6)), {"true": "retain", "probs": {"retain": 0.9}, "spans": spans})]
    with pytest.raises(AssertionError, match=r"weak filter trained on tagged tokens \[3, 4, 5\]"):
        _check_filter("weak", retain_doc, 4, 2)
    monkeypatch.undo()
    _check_filter("weak", retain_doc, 4, 2)
