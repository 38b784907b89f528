"""Data preparation across processes: split `sgtm data shard`/`tag` runs merge into exactly the bytes
of the one-process run; merges refuse missing, partial and duplicate ranks; fastText and Hugging Face
classifier backends; `--skip-bad-records`.

Inputs are a few hundred documents of the bundled corpora (data/); the classifiers are trained or
built in the test's tmp dir (nothing is downloaded).
"""

from __future__ import annotations

import gzip
import json
import lzma
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.cli import main as data_main
from pipeline.data.distributed_prep import (
    PARTS,
    Split,
    merge_shard_parts,
    owner,
    resolve_split,
    split_from_env,
    write_shard_part,
)
from pipeline.data.errors import DataError
from pipeline.data.shards import iter_shard_documents, load_manifest, write_shards
from pipeline.data.tagging import RANKS
from pipeline.data.tokenizer import load_gpt2

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
LABELS = str(ROOT / "configs/data/tinystories_labels.yaml")
SEQ = 64
SIZE_MB = "0.05"


def _head(src: Path, n: int) -> list[str]:
    with lzma.open(src, "rt", encoding="utf-8") as handle:
        return [next(handle) for _ in range(n)]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under a directory (relative name -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_identical(a: Path, b: Path) -> int:
    """Same file names and the same bytes in every file; returns the number of files compared."""
    left, right = tree(a), tree(b)
    assert sorted(left) == sorted(right), f"{a} vs {b}: files differ: {sorted(set(left) ^ set(right))}"
    different = [name for name in left if left[name] != right[name]]
    assert not different, f"{a} vs {b}: bytes differ in {different}"
    return len(left)


def cli(*argv: str) -> int:
    rc = data_main(list(argv))
    assert rc == 0, f"sgtm data {' '.join(argv)} exited {rc}"
    return rc


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three inputs of 330 documents: 150 English stories (jsonl), 150 Spanish ones (jsonl.gz) and 30
    Wikipedia leads as a text file; plus a language classifier trained on them."""
    root = tmp_path_factory.mktemp("prep")
    en = root / "en.jsonl"
    en.write_text("".join(_head(DATA / "tinystories/stories_en.jsonl.xz", 150)), encoding="utf-8")
    es = root / "es.jsonl.gz"
    with gzip.open(es, "wt", encoding="utf-8") as handle:
        handle.write("".join(_head(DATA / "tinystories/stories_es.jsonl.xz", 150)))
    wiki = root / "wiki.txt"
    texts = [json.loads(line)["text"] for line in _head(DATA / "wiki_vital/articles_en.jsonl.xz", 30)]
    wiki.write_text("\n<|endoftext|>\n".join(texts) + "\n", encoding="utf-8")
    inputs = [str(en), str(es), str(wiki)]
    cli("train-classifier", "--input", str(en), str(es), "--labels", LABELS, "--kind", "chars",
        "--out", str(root / "lang.npz"), "--train-fraction", "0.5", "--heldout-fraction", "0.2")
    return {"root": root, "inputs": inputs, "classifier": str(root / "lang.npz")}


def shard_args(corpus: dict, out: Path, *extra: str) -> list[str]:
    return ["shard", "--input", *corpus["inputs"], "--tokenizer", "gpt2", "--seq-len", str(SEQ), "--out", str(out),
            "--source", "mix", "--shard-size-mb", SIZE_MB, "--quiet", *extra]


def tag_args(corpus: dict, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["tag", "--shards", str(shards), "--classifier", corpus["classifier"], "--out", str(out),
            "--labels", LABELS, "--forget-threshold", "0.6", "--quiet", *extra]


@pytest.fixture(scope="module")
def single(corpus) -> Path:
    """The one-process reference: shards and tags."""
    root = corpus["root"] / "single"
    cli(*shard_args(corpus, root / "shards"))
    cli(*tag_args(corpus, root / "shards", root / "tags"))
    return root


def _rank_main(argv: list[str], rank: int, world: int) -> None:
    """A forked rank: torchrun's variables in the environment, --rank-from-env on the command line."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    os._exit(data_main([*argv, "--rank-from-env"]))


def run_ranks_in_processes(argv: list[str], world: int) -> None:
    """`world` ranks as concurrent OS processes (fork: no second import of the data layer)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(argv, r, world)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * world


# ------------------------------------------------------------------------------- byte identity


def test_two_processes_give_the_single_process_bytes(corpus, single):
    """2 concurrent rank processes (RANK/WORLD_SIZE from the environment), then the merges: the shard
    directory (manifest + every tar) and the tag directory (tags.json + every sidecar) are byte for
    byte those of one process; nothing of the split run is left behind. (tags.json names the shard
    directory it tagged, so both tag runs tag the reference shards, proven identical just before.)"""
    root = corpus["root"] / "two"
    run_ranks_in_processes(shard_args(corpus, root / "shards", "--block-records", "16"), 2)
    assert sorted(p.name for p in (root / "shards" / PARTS).iterdir()) == ["rank-00000-of-00002",
                                                                           "rank-00001-of-00002"]
    assert not (root / "shards" / "manifest.json").exists()  # ranks write parts only
    cli(*shard_args(corpus, root / "shards", "--merge"))
    n_shards = assert_identical(single / "shards", root / "shards")
    run_ranks_in_processes(tag_args(corpus, single / "shards", root / "tags"), 2)
    assert not (root / "tags" / "tags.json").exists()
    cli(*tag_args(corpus, single / "shards", root / "tags", "--merge"))
    n_tags = assert_identical(single / "tags", root / "tags")
    manifest = load_manifest(single / "shards")
    assert manifest["totals"]["docs"] == 330 and n_shards == len(manifest["shards"]) + 1 >= 20
    assert n_tags == n_shards  # a sidecar per shard + tags.json
    print(f"2 processes: {n_shards} shard files and {n_tags} tag files identical "
          f"({manifest['totals']['tokens']} tokens, {manifest['totals']['docs']} documents)")


def test_three_ranks_in_any_order_give_the_single_process_bytes(corpus, single):
    """3 ranks run in the order 2, 0, 1 (block size 7: every input's records spread over all ranks)."""
    root = corpus["root"] / "three"
    for rank in (2, 0, 1):
        cli(*shard_args(corpus, root / "shards", "--rank", str(rank), "--world-size", "3", "--block-records", "7"))
    cli(*shard_args(corpus, root / "shards", "--merge"))
    assert_identical(single / "shards", root / "shards")
    for rank in (2, 0, 1):
        cli(*tag_args(corpus, single / "shards", root / "tags", "--rank", str(rank), "--world-size", "3"))
    cli(*tag_args(corpus, single / "shards", root / "tags", "--merge"))
    assert_identical(single / "tags", root / "tags")


def test_merge_in_rank_order_is_caught(corpus, single, monkeypatch):
    """Mutation: a merge that concatenates the ranks' outputs (rank 0's documents, then rank 1's)
    instead of restoring input order writes different shards, and the comparison sees it."""
    import pipeline.data.distributed_prep as prep

    monkeypatch.setattr(prep.heapq, "merge", lambda *streams, key: (x for s in streams for x in s))
    root = corpus["root"] / "mutant"
    for rank in range(2):
        cli(*shard_args(corpus, root / "shards", "--rank", str(rank), "--world-size", "2", "--block-records", "16"))
    cli(*shard_args(corpus, root / "shards", "--merge"))
    with pytest.raises(AssertionError, match="bytes differ"):
        assert_identical(single / "shards", root / "shards")


# A small mixed input: jsonl with blank lines and bad records, a text file, a parquet file with a null text.
MIXED_BAD = {"missing_text": 3, "bad_json": 2, "invalid_utf8": 2}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixed")
    stories = [json.loads(line)["text"] for line in _head(DATA / "tinystories/stories_en.jsonl.xz", 60)]
    lines = [json.dumps({"id": f"s{i}", "text": t[: 40 + 37 * i % 400]}).encode() for i, t in enumerate(stories[:30])]
    lines[3] = b'{"id": "x", "text": null}'
    lines[7] = b'{"id": "y"}'
    lines[11] = b'{"id": "z", "text": "broken'
    lines[12] = b'["not", "an", "object"]'
    lines[15] = b'{"id": "u", "text": "caf\xe9"}'
    lines[20] = b""
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    chunks = [t[: 30 + 53 * i % 300] for i, t in enumerate(stories[30:45])]
    chunks[4] = ""  # an empty chunk: no document, not a bad record
    encoded = [c.encode() for c in chunks]
    encoded[9] = encoded[9][:12] + b"\xff" + encoded[9][12:]  # invalid UTF-8 inside chunk 9
    (root / "b.txt").write_bytes(b"\n<|endoftext|>\n".join(encoded) + b"\n")
    rows = [{"id": f"p{i}", "text": t[: 50 + 29 * i % 200]} for i, t in enumerate(stories[45:60])]
    rows[2]["text"] = None
    pq.write_table(pa.Table.from_pylist(rows), root / "c.parquet")
    return [str(root / "a.jsonl"), str(root / "b.txt"), str(root / "c.parquet")]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(1, 5), block=st.integers(1, 9), size_mb=st.sampled_from([0.002, 0.006]),
       order=st.randoms(use_true_random=False))
def test_any_split_of_mixed_inputs_merges_to_the_same_bytes(gpt2, mixed, tmp_path_factory, world, block, size_mb,
                                                            order):
    """Property: for any world size, block size and order of the ranks, on jsonl (blank lines, bad
    records), text (an empty chunk, invalid UTF-8) and parquet (a null text) with --skip-bad-records,
    the merge is byte-identical to one process, including the bad-record counts."""
    tmp = tmp_path_factory.mktemp("prop")
    single = write_shards(mixed, gpt2, 16, tmp / "single", source="m", shard_size_mb=size_mb, progress=False,
                          skip_bad_records=True)
    assert single["bad_records"]["total"] == MIXED_BAD
    ranks = list(range(world))
    order.shuffle(ranks)
    for rank in ranks:
        write_shard_part(mixed, gpt2, 16, tmp / "split", Split(rank, world), source="m", shard_size_mb=size_mb,
                         block_records=block, skip_bad_records=True, progress=False)
    merge_shard_parts(mixed, gpt2, 16, tmp / "split", source="m", shard_size_mb=size_mb, skip_bad_records=True,
                      progress=False)
    assert_identical(tmp / "single", tmp / "split")


def test_owner_rule_deals_blocks_round_robin():
    """The documented rule: block i // B of file f goes to rank (f + i // B) mod W."""
    got = [[owner(f, i, 3, 2) for i in range(8)] for f in range(2)]
    assert got == [[0, 0, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 0, 0, 1, 1]]


# ------------------------------------------------------------------------------ merge refusals


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_shard_merge_refuses_missing_partial_duplicate_and_mixed_ranks(gpt2, mixed, tmp_path):
    out = tmp_path / "s"
    kw = {"source": "m", "shard_size_mb": 0.004, "skip_bad_records": True, "progress": False}

    def part(rank: int, world: int = 3, **extra) -> None:
        write_shard_part(mixed, gpt2, 16, out, Split(rank, world), block_records=4, **{**kw, **extra})

    def merge() -> str:
        with pytest.raises(DataError) as exc:
            merge_shard_parts(mixed, gpt2, 16, out, **kw)
        return _one_line(exc)

    assert "no rank outputs to merge" in merge()
    part(0)
    part(2)
    assert merge() == f"{out / PARTS}: missing ranks [1] of world size 3; re-run those ranks before merging"
    part(1)
    (out / PARTS / "rank-00001-of-00003" / "COMPLETE").unlink()  # rank 1 died before its marker
    assert merge().endswith("missing ranks [1] of world size 3; partial (no COMPLETE marker, never merged): "
                            "rank-00001-of-00003; re-run those ranks before merging")
    part(1)  # the re-run redoes the partial output
    shutil.copytree(out / PARTS / "rank-00001-of-00003", out / PARTS / "rank-00001-copy")
    assert "duplicate rank 1 (in rank-00001-copy and rank-00001-of-00003)" in merge()
    shutil.rmtree(out / PARTS / "rank-00001-copy")
    part(0, world=2)
    assert "rank outputs of different world sizes [2, 3]" in merge()
    shutil.rmtree(out / PARTS / "rank-00000-of-00002")
    with pytest.raises(DataError, match="rank 0 was run with different --skip-bad-records"):
        merge_shard_parts(mixed, gpt2, 16, out, **{**kw, "skip_bad_records": False})
    with pytest.raises(DataError, match="rank 0 was run with different inputs, tokenizer, --seq-len"):
        merge_shard_parts(mixed, gpt2, 17, out, **kw)
    tokens = out / PARTS / "rank-00002-of-00003" / "tokens.bin"
    saved = tokens.read_bytes()
    tokens.write_bytes(saved[:-2])
    assert "tokens.bin: missing or truncated rank output" in merge()
    tokens.write_bytes(saved)
    manifest = merge_shard_parts(mixed, gpt2, 16, out, **kw)
    assert manifest["complete"] and not (out / PARTS).exists()
    single = write_shards(mixed, gpt2, 16, tmp_path / "one", **kw)
    assert manifest == single


def test_tag_merge_refuses_missing_and_duplicate_ranks(corpus, single, tmp_path, capsys):
    shards, out = single / "shards", tmp_path / "tags"
    cli(*tag_args(corpus, shards, out, "--rank", "0", "--world-size", "2"))
    assert data_main(tag_args(corpus, shards, out, "--merge")) == 2
    cli(*tag_args(corpus, shards, out, "--rank", "1", "--world-size", "2"))
    shutil.copy(out / RANKS / "rank-00001-of-00002.json", out / RANKS / "rank-00001-again.json")
    assert data_main(tag_args(corpus, shards, out, "--merge")) == 2
    (out / RANKS / "rank-00001-again.json").unlink()
    assert data_main(tag_args(corpus, shards, out, "--merge", "--forget-threshold", "0.9")) == 2
    assert not (out / "tags.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"sgtm: error: {out / RANKS}: missing ranks [1] of world size 2; re-run those ranks before merging",
        f"sgtm: error: {out / RANKS}: duplicate rank 1 (in rank-00001-again.json and rank-00001-of-00002.json); "
        "remove one",
        f"sgtm: error: {out / RANKS}: rank 0 was run with different --shards, --classifier, --labels, thresholds "
        "or label map than this merge (give the merge the ranks' arguments)",
    ]
    cli(*tag_args(corpus, shards, out, "--merge"))
    assert_identical(single / "tags", out)


def test_cli_errors_are_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "s"
    assert data_main(shard_args(corpus, out, "--merge", "--rank", "0", "--world-size", "2")) == 2
    assert data_main(shard_args(corpus, out, "--rank", "2", "--world-size", "2")) == 2
    assert data_main(shard_args(corpus, out, "--rank", "0")) == 2
    assert data_main(shard_args(corpus, out, "--merge")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sgtm: error: --merge: the merge is one process; drop --rank/--world-size/--rank-from-env",
        "sgtm: error: --rank: expected 0 <= rank < world size 2, got 2",
        "sgtm: error: --rank and --world-size: give both or neither",
        f"sgtm: error: {out / PARTS}: no rank outputs to merge (run the ranks of "
        "`sgtm data shard --rank R --world-size W` first)",
    ]


def test_split_from_the_environment():
    """SLURM array first (offset by SLURM_ARRAY_TASK_MIN), else torchrun's RANK/WORLD_SIZE, else srun's."""
    assert split_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3",
                           "RANK": "0", "WORLD_SIZE": "8"}) == Split(1, 3)
    assert split_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == Split(2, 3)
    assert split_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == Split(3, 4)
    assert split_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "RANK": "1", "WORLD_SIZE": "2"}) == Split(1, 2)
    assert split_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16"}) == Split(5, 16)
    with pytest.raises(DataError, match="SLURM_ARRAY_TASK_STEP: the array must be contiguous"):
        split_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "2"})
    with pytest.raises(DataError, match="--rank: expected 0 <= rank < world size 3, got 3"):
        split_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(DataError, match="none of SLURM_ARRAY_TASK_ID"):
        split_from_env({})
    with pytest.raises(DataError, match="give it or --rank/--world-size, not both"):
        resolve_split(0, 2, True)
    assert resolve_split(None, None, False) is None and resolve_split(1, 2, False) == Split(1, 2)


# --------------------------------------------------------------------------------- bad records


def test_skip_bad_records_counts_and_reports(mixed, tmp_path, capsys):
    """Without the flag: the first bad record stops the run with one line naming file and line. With
    it: the manifest counts each kind per file, the command prints the counts and the first one, and
    every good document is sharded."""
    argv = ["shard", "--input", *mixed, "--tokenizer", "gpt2", "--seq-len", "16", "--source", "m", "--quiet"]
    assert data_main([*argv, "--out", str(tmp_path / "strict")]) == 2
    assert capsys.readouterr().err.strip() == (f"sgtm: error: {mixed[0]}:4: expected a string field 'text' "
                                               "(got null)")
    assert data_main([*argv, "--out", str(tmp_path / "skip"), "--skip-bad-records"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == ("--skip-bad-records: skipped 7 (missing_text 3, bad_json 2, invalid_utf8 2); "
                           f"first: {mixed[0]}:4: expected a string field 'text' (got null)")
    manifest = load_manifest(tmp_path / "skip")
    files = manifest["bad_records"]["files"]
    resolved = [str(Path(p).resolve()) for p in mixed]
    assert manifest["bad_records"]["total"] == MIXED_BAD
    assert files == {
        resolved[0]: {"missing_text": 2, "bad_json": 2, "invalid_utf8": 1},
        resolved[1]: {"missing_text": 0, "bad_json": 0, "invalid_utf8": 1},
        resolved[2]: {"missing_text": 1, "bad_json": 0, "invalid_utf8": 0},
    }
    assert manifest["bad_records"]["first"][:3] == [
        f"{mixed[0]}:4: expected a string field 'text' (got null)",
        f"{mixed[0]}:8: expected a string field 'text' (got missing)",
        f"{mixed[0]}:12: invalid JSON (Invalid control character at)",
    ]
    # 30 jsonl lines - 5 bad - 1 blank; 15 text chunks - 1 empty - 1 bad; 15 rows - 1 null
    assert manifest["totals"]["docs"] == 24 + 13 + 14
    keys = [d.key for e in manifest["shards"] for d in iter_shard_documents(tmp_path / "skip" / e["name"], e)]
    assert "x" not in keys and "s0" in keys and "b.txt:9" not in keys and "b.txt:10" in keys and "p2" not in keys


def test_a_bad_record_fails_only_the_rank_that_owns_it(gpt2, tmp_path):
    """Each rank parses and checks only its own records: the owner of the invalid UTF-8 line fails
    with the usual one-line error naming file and line; the other rank finishes."""
    path = tmp_path / "one.jsonl"
    lines = [json.dumps({"text": f"story number {i}"}).encode() for i in range(8)]
    lines[5] = b'{"text": "caf\xe9"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    outcomes = {}
    for rank in range(2):
        try:
            write_shard_part([str(path)], gpt2, 16, tmp_path / "s", Split(rank, 2), block_records=4, progress=False)
            outcomes[rank] = "complete"
        except DataError as exc:
            outcomes[rank] = str(exc)
    assert owner(0, 5, 2, 4) == 1
    assert outcomes == {0: "complete",
                        1: f"{path}:6: invalid UTF-8 (byte 0xe9 at column 14); inputs must be UTF-8 text"}


# ----------------------------------------------------------------------------- classifier backends


def _sidecars(tags: Path) -> list[dict]:
    records = []
    for path in sorted(tags.glob("*.tags.jsonl")):
        records.extend(json.loads(line) for line in path.read_text().splitlines()[1:])
    return records


@pytest.fixture(scope="module")
def stories(corpus, single) -> dict:
    """The 300 stories' shards of the reference run (and the documents' texts, by doc index)."""
    gpt2 = load_gpt2()
    shards = single / "shards"
    manifest = load_manifest(shards)
    texts = {d.doc_index: gpt2.decode(d.tokens[:-1]) for e in manifest["shards"]
             for d in iter_shard_documents(shards / e["name"], e)}
    return {"shards": shards, "texts": texts, "gpt2": gpt2}


FASTTEXT_TRAIN = """
import fasttext, json, sys
train, model_path, texts_path, out = sys.argv[1:]
model = fasttext.train_supervised(train, epoch=10, lr=0.1, dim=16, thread=1, seed=0, verbose=0)
model.save_model(model_path)
texts = json.load(open(texts_path))
labels, probs = model.predict([t.replace("\\n", " ") for t in texts], k=-1, threshold=0.0)
json.dump([{n: float(p) for n, p in zip(ls, ps)} for ls, ps in zip(labels, probs)], open(out, "w"))
"""


def test_fasttext_backend(corpus, stories, tmp_path):
    """A fastText model trained here on the stories tags them through `--classifier model.bin`:
    probabilities are the model's own (fastText's predict on the same text, in the process that
    trained it), labels are roles, the language is right, and a 2-rank split gives the same sidecars.

    Training runs in a fresh interpreter: fastText 0.9.2 reads memory it did not initialise, so a
    training in a process that has already allocated and freed a lot (here: the third training in
    one process, or one after torch's import) can stop with "Encountered NaN"."""
    lines = []
    for path, role in ((corpus["inputs"][0], "retain"), (corpus["inputs"][1], "forget:spanish")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            lines += [f"__label__{role} " + json.loads(line)["text"].replace("\n", " ") for line in handle]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    checked = sorted(stories["texts"])[::37]
    (tmp_path / "texts.json").write_text(json.dumps([stories["texts"][i] for i in checked]))
    subprocess.run([sys.executable, "-c", FASTTEXT_TRAIN, str(tmp_path / "train.txt"), str(tmp_path / "lang.bin"),
                    str(tmp_path / "texts.json"), str(tmp_path / "reference.json")], check=True, timeout=300)
    reference = json.loads((tmp_path / "reference.json").read_text())
    argv = ["tag", "--shards", str(stories["shards"]), "--classifier", str(tmp_path / "lang.bin"), "--labels", LABELS,
            "--quiet"]
    cli(*argv, "--out", str(tmp_path / "tags"))
    records = {r["doc"]: r for r in _sidecars(tmp_path / "tags")}
    assert len(records) == 330
    summary = json.loads((tmp_path / "tags" / "tags.json").read_text())
    assert summary["classes"] == ["forget:spanish", "retain"]
    stories_only = [r for r in records.values() if r["doc"] < 300]
    correct = sum(r["label"] == r["true"] for r in stories_only)
    assert correct >= 0.95 * len(stories_only), f"{correct}/{len(stories_only)}"
    for doc, expected in zip(checked, reference, strict=True):
        assert records[doc]["probs"] == {n.removeprefix("__label__"): round(min(1.0, p), 4)
                                         for n, p in expected.items()}
    for rank in range(2):
        cli(*argv, "--out", str(tmp_path / "split"), "--rank", str(rank), "--world-size", "2")
    cli(*argv, "--out", str(tmp_path / "split"), "--merge")
    assert_identical(tmp_path / "tags", tmp_path / "split")


@pytest.fixture(scope="module")
def few(corpus, gpt2) -> dict:
    """60 stories (30 per language) in 6+ shards, for the (slower) transformer classifier."""
    root = corpus["root"] / "few"
    root.mkdir()
    inputs = []
    for lang in ("en", "es"):
        (root / f"{lang}.jsonl").write_text("".join(_head(DATA / f"tinystories/stories_{lang}.jsonl.xz", 30)))
        inputs.append(str(root / f"{lang}.jsonl"))
    manifest = write_shards(inputs, gpt2, SEQ, root / "shards", source="few", shard_size_mb=0.02, progress=False)
    assert len(manifest["shards"]) >= 6
    texts = {d.doc_index: gpt2.decode(d.tokens[:-1]) for e in manifest["shards"]
             for d in iter_shard_documents(root / "shards" / e["name"], e)}
    return {"shards": root / "shards", "texts": texts}


def _tiny_hf_classifier(directory: Path, id2label: dict[int, str]) -> Path:
    """A random 1-layer GPT2ForSequenceClassification with the bundled GPT-2 tokenizer (no pad token,
    as GPT-2 ships), saved like any local checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(0)
    gpt2 = load_gpt2()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=gpt2.tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", model_max_length=64)
    config = GPT2Config(vocab_size=gpt2.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _reference_probs(directory: Path, texts: list[str]) -> list[np.ndarray]:
    """The model on each text alone (unbatched, unpadded), outside the pipeline."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=64, return_tensors="pt")
            out.append(torch.softmax(model(**ids).logits[0], -1).numpy())
    return out


def test_hugging_face_backend(few, tmp_path):
    """A local AutoModelForSequenceClassification directory, batched (padding, longest first): each
    document's probabilities equal the model's on that text alone; model labels map through
    id2label and --label-map (two labels mapped to one role add up); a 2-rank split is identical."""
    model_dir = _tiny_hf_classifier(tmp_path / "hf", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    argv = ["tag", "--shards", str(few["shards"]), "--classifier", str(model_dir), "--labels", LABELS,
            "--label-map", "LABEL_0=retain,LABEL_1=forget:spanish,LABEL_2=retain", "--batch-size", "16",
            "--device", "cpu", "--quiet"]
    cli(*argv, "--out", str(tmp_path / "tags"))
    records = _sidecars(tmp_path / "tags")
    assert len(records) == 60
    assert json.loads((tmp_path / "tags" / "tags.json").read_text())["classes"] == ["forget:spanish", "retain"]
    checked = records[::5]
    for r, p in zip(checked, _reference_probs(model_dir, [few["texts"][r["doc"]] for r in checked]), strict=True):
        expected = {"forget:spanish": p[1], "retain": p[0] + p[2]}
        assert r["probs"].keys() == expected.keys()
        for role, value in expected.items():
            assert abs(r["probs"][role] - value) <= 1e-4 + 1e-6, (r["doc"], role, r["probs"], expected)
        assert r["label"] == max(expected, key=expected.get)
    assert any(r["spans"] for r in records), "no multi-paragraph document was scored per paragraph"
    for rank in range(2):
        cli(*argv, "--out", str(tmp_path / "split"), "--rank", str(rank), "--world-size", "2")
    cli(*argv, "--out", str(tmp_path / "split"), "--merge")
    assert_identical(tmp_path / "tags", tmp_path / "split")


def test_hugging_face_labels_must_be_roles(few, tmp_path, capsys):
    """id2label names that are already roles need no map; others are a one-line error saying how to map."""
    roles_dir = _tiny_hf_classifier(tmp_path / "roles", {0: "retain", 1: "forget:spanish"})
    cli("tag", "--shards", str(few["shards"]), "--classifier", str(roles_dir), "--out", str(tmp_path / "t"),
        "--quiet")
    assert json.loads((tmp_path / "t" / "tags.json").read_text())["domains"] == ["spanish"]
    other = _tiny_hf_classifier(tmp_path / "other", {0: "english", 1: "spanish"})
    capsys.readouterr()
    base = ["tag", "--shards", str(few["shards"]), "--classifier", str(other), "--out", str(tmp_path / "u")]
    assert data_main(base) == 2
    assert data_main([*base, "--label-map", "englsh=retain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"sgtm: error: {other}: model label 'english' is not a role ('retain', 'adjacent', 'forget:<domain>'); "
        "map it with --label-map english=ROLE",
        f"sgtm: error: --label-map: ['englsh'] are not labels of {other} (its labels: ['english', 'spanish'])",
    ]
