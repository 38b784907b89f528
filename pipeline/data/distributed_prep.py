"""Data preparation split across processes and nodes: ranks do the expensive work, one merge writes
the result, byte-identical to the single-process run (test: tests/test_data_prep.py).

**Sharding.** Tokenizing is the expensive part; packing is cheap and sequential. So the split is over
input records: record `i` of input file `f` (records as in :mod:`pipeline.data.readers`: a jsonl line, a
text chunk, a parquet/datasets row) lies in block `i // B` (`B` = `--block-records`) and belongs to rank
`(f + i // B) mod W`. Every rank reads every input but parses, checks and tokenizes only its own
records, and writes them, tokenized, to `<out>/_parts/rank-RRRRR-of-WWWWW/` (`docs.jsonl` +
`tokens.bin`, then a `COMPLETE` marker). The merge streams the ranks' documents back in input order
(a k-way merge on (file, record)) through the very writer `write_shards` uses, numbering documents
and shards as one process would, so manifest and tar bytes are identical for any W and B; then it
deletes `_parts`. Shard boundaries depend on every earlier document, which is why ranks do not write
final shards themselves.

**Tagging.** Each shard is tagged on its own, so rank `r` of `W` tags the contiguous shard range
`[r*n//W, (r+1)*n//W)` of the manifest and writes those sidecars directly (each identical to the
single-process one), plus `<tags>/_ranks/rank-RRRRR-of-WWWWW.json` with its part of the (true label x
mode) table. The merge sums the tables and writes `tags.json`.

**Rules for both merges.** A rank's output counts only with its marker, written last and atomically
(temp + rename); outputs without one are partial and never merged. Missing ranks, duplicate ranks,
ranks of different world sizes or made with different settings are refused with one line.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.errors import DataError
from pipeline.data.io import atomic_write_json
from pipeline.data.readers import Document, ReadReport, iter_documents
from pipeline.data.shards import existing_manifest, pack_documents, shard_identity, tokenized
from pipeline.data.tokenizer import TextTokenizer

PART_FORMAT = "sgtm-shard-part/1"
PARTS = "_parts"
COMPLETE = "COMPLETE"
DEFAULT_BLOCK_RECORDS = 4096


@dataclass(frozen=True)
class Split:
    """This process's share of a split run: rank in [0, world)."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if self.world < 1:
            raise DataError(f"--world-size: expected a positive integer, got {self.world}")
        if not 0 <= self.rank < self.world:
            raise DataError(f"--rank: expected 0 <= rank < world size {self.world}, got {self.rank}")

    @property
    def name(self) -> str:
        return f"rank-{self.rank:05d}-of-{self.world:05d}"


def split_from_env(env: os._Environ | dict | None = None) -> Split:
    """The split a scheduler gives: a SLURM array task (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
    SLURM_ARRAY_TASK_COUNT; the array must be contiguous), else torchrun's RANK of WORLD_SIZE, else
    srun's SLURM_PROCID of SLURM_NTASKS."""
    env = os.environ if env is None else env

    def integer(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise DataError(f"{name}: expected an integer, got {env[name]!r}") from None

    if "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise DataError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
        if "SLURM_ARRAY_TASK_STEP" in env and integer("SLURM_ARRAY_TASK_STEP") != 1:
            raise DataError("SLURM_ARRAY_TASK_STEP: the array must be contiguous (--array=0-N, no :step)")
        low = integer("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return Split(integer("SLURM_ARRAY_TASK_ID") - low, integer("SLURM_ARRAY_TASK_COUNT"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return Split(integer("RANK"), integer("WORLD_SIZE"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun's tasks
        return Split(integer("SLURM_PROCID"), integer("SLURM_NTASKS"))
    raise DataError(
        "--rank-from-env: none of SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (a SLURM job array), "
        "RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS (srun) is set"
    )


def resolve_split(rank: int | None, world: int | None, from_env: bool) -> Split | None:
    """--rank/--world-size, or --rank-from-env; None when neither (one process does everything)."""
    if from_env:
        if rank is not None or world is not None:
            raise DataError("--rank-from-env: give it or --rank/--world-size, not both")
        return split_from_env()
    if (rank is None) != (world is None):
        raise DataError("--rank and --world-size: give both or neither")
    return None if rank is None else Split(rank, world)


def owner(file_index: int, record_index: int, world: int, block_records: int) -> int:
    """The rank that tokenizes a record: blocks of `block_records` records dealt round-robin, starting
    one rank later in each input file (so many small files spread too)."""
    return (file_index + record_index // block_records) % world


def shard_range(n: int, split: Split) -> range:
    """Rank r's contiguous share of n shards (sizes differ by at most one)."""
    return range(split.rank * n // split.world, (split.rank + 1) * n // split.world)


# ------------------------------------------------------------------------------ rank bookkeeping


def collect_ranks(root: Path, markers: list[tuple[str, Path | None]], what: str) -> dict[int, tuple[str, dict]]:
    """rank -> (output name, marker record) of a complete set of rank outputs under `root`, or a one-line DataError.

    `markers`: (output name, marker path or None when the output has no marker: partial). Each marker
    holds {"rank", "world", ...}; all must share one world size and cover 0..world-1 exactly once."""
    if not markers:
        raise DataError(f"{root}: no rank outputs to merge (run the ranks of `{what}` first)")
    by_rank: dict[int, tuple[str, dict]] = {}
    worlds: set[int] = set()
    partial: list[str] = []
    for name, marker in markers:
        if marker is None:
            partial.append(name)
            continue
        try:
            record = json.loads(marker.read_text())
            rank, world = int(record["rank"]), int(record["world"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{marker}: unreadable rank marker ({type(exc).__name__})") from None
        if rank in by_rank and by_rank[rank][1]["world"] == world:
            raise DataError(f"{root}: duplicate rank {rank} (in {by_rank[rank][0]} and {name}); remove one")
        worlds.add(world)
        by_rank[rank] = (name, record)
    if len(worlds) > 1:
        raise DataError(f"{root}: rank outputs of different world sizes {sorted(worlds)}; remove the stale ones")
    world = worlds.pop() if worlds else None
    missing = sorted(set(range(world)) - set(by_rank)) if world else []
    if world is None or missing:
        detail = f"missing ranks {missing} of world size {world}" if world else "no complete rank"
        hint = f"; partial (no {COMPLETE} marker, never merged): {', '.join(partial)}" if partial else ""
        raise DataError(f"{root}: {detail}{hint}; re-run those ranks before merging")
    return by_rank


def check_same(ranks: dict[int, tuple[str, dict]], key: str, expected: object, root: Path, flag: str) -> None:
    for rank, (_, record) in sorted(ranks.items()):
        if record.get(key) != expected:
            raise DataError(
                f"{root}: rank {rank} was run with different {flag} than this merge "
                "(give the merge the ranks' arguments)"
            )


# ------------------------------------------------------------------------------------ sharding


def write_shard_part(
    inputs: list[str],
    tokenizer: TextTokenizer,
    seq_len: int,
    out: str | os.PathLike,
    split: Split,
    *,
    source: str | None = None,
    shard_size_mb: float = 16.0,
    block_records: int = DEFAULT_BLOCK_RECORDS,
    skip_bad_records: bool = False,
    progress: bool = True,
) -> dict:
    """Rank `split.rank`'s share of `sgtm data shard`: tokenize its records into
    `<out>/_parts/<rank>/`; the marker record (also returned) is written last. Idempotent: a complete
    part made with the same settings is kept; anything else there is partial and is redone."""
    if block_records < 1:
        raise DataError(f"--block-records: expected a positive integer, got {block_records}")
    out = Path(out)
    identity = shard_identity(inputs, tokenizer, seq_len, source, shard_size_mb)
    done = existing_manifest(out, identity)
    if done is not None and done.get("complete"):
        return {"rank": split.rank, "world": split.world, "already_merged": True}
    directory = out / PARTS / split.name
    expected = {"format": PART_FORMAT, "rank": split.rank, "world": split.world, "block_records": block_records,
                "skip_bad_records": skip_bad_records, "identity": identity}
    marker = directory / COMPLETE
    if marker.exists():
        record = json.loads(marker.read_text())
        if {k: record.get(k) for k in expected} == expected:
            return record
    if directory.exists():
        shutil.rmtree(directory)  # partial or made differently: redo
    directory.mkdir(parents=True)
    report = ReadReport(skip_bad=skip_bad_records)
    dtype = np.dtype(identity["dtype"])
    want = lambda f, i: owner(f, i, split.world, block_records) == split.rank  # noqa: E731
    docs = tokens = 0
    from tqdm import tqdm

    bar = tqdm(desc=f"shard {split.name}", unit=" docs", disable=not progress)
    with open(directory / "docs.jsonl.tmp", "w", encoding="utf-8") as index, \
            open(directory / "tokens.bin.tmp", "wb") as data:
        for _, document, ids in tokenized(iter_documents(inputs, report, want), tokenizer):
            index.write(json.dumps([*document.position, document.key, document.meta, len(ids)]) + "\n")
            data.write(ids.astype(dtype).tobytes())
            docs, tokens = docs + 1, tokens + len(ids)
            bar.update(1)
        for handle in (index, data):
            handle.flush()
            os.fsync(handle.fileno())
    bar.close()
    for name in ("docs.jsonl", "tokens.bin"):
        os.replace(directory / f"{name}.tmp", directory / name)
    record = {**expected, "docs": docs, "tokens": tokens, "report": report.to_dict(),
              "bytes": {n: (directory / n).stat().st_size for n in ("docs.jsonl", "tokens.bin")}}
    atomic_write_json(marker, record)
    return record


def _part_documents(directory: Path, record: dict, dtype: np.dtype) -> Iterator[tuple[tuple[int, int], Document,
                                                                                   np.ndarray]]:
    """One rank's documents in its (file, record) order, checked against its marker."""
    for name, size in record["bytes"].items():
        if not (directory / name).exists() or (directory / name).stat().st_size != size:
            raise DataError(f"{directory / name}: missing or truncated rank output (marker says {size} bytes)")
    tokens = np.memmap(directory / "tokens.bin", dtype=dtype, mode="r") if record["tokens"] else np.zeros(0, dtype)
    offset = docs = 0
    last = (-1, -1)
    with open(directory / "docs.jsonl", encoding="utf-8") as index:
        for line in index:
            f, i, key, meta, n = json.loads(line)
            if (f, i) <= last:
                raise DataError(f"{directory / 'docs.jsonl'}: documents out of input order at ({f}, {i})")
            last = (f, i)
            document = Document(key=key, text="", meta=meta, position=(f, i))
            yield (f, i), document, np.asarray(tokens[offset : offset + n], dtype=np.int64)
            offset, docs = offset + n, docs + 1
    if (docs, offset) != (record["docs"], record["tokens"]):
        raise DataError(f"{directory}: rank output holds {docs} documents/{offset} tokens, "
                        f"its marker says {record['docs']}/{record['tokens']}")


def merge_shard_parts(
    inputs: list[str],
    tokenizer: TextTokenizer,
    seq_len: int,
    out: str | os.PathLike,
    *,
    source: str | None = None,
    shard_size_mb: float = 16.0,
    skip_bad_records: bool = False,
    progress: bool = True,
    keep_parts: bool = False,
) -> dict:
    """The merge of a split `sgtm data shard`: pack every rank's documents in input order into the
    shards and manifest one process would have written; then delete `_parts` (unless keep_parts).
    Restartable like `write_shards` (a crashed merge continues after its last complete shard)."""
    out = Path(out)
    identity = shard_identity(inputs, tokenizer, seq_len, source, shard_size_mb)
    done = existing_manifest(out, identity)
    if done is not None and done.get("complete"):
        return done
    root = out / PARTS
    dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    ranks = collect_ranks(root, [(d.name, d / COMPLETE if (d / COMPLETE).exists() else None) for d in dirs],
                          "sgtm data shard --rank R --world-size W")
    check_same(ranks, "identity", identity, root, "inputs, tokenizer, --seq-len, --source or --shard-size-mb")
    check_same(ranks, "skip_bad_records", skip_bad_records, root, "--skip-bad-records")
    blocks = {record["block_records"] for _, record in ranks.values()}
    if len(blocks) > 1:
        raise DataError(f"{root}: ranks used different --block-records {sorted(blocks)}")
    report = ReadReport(skip_bad=skip_bad_records)
    for rank in sorted(ranks):
        report.add(ReadReport.from_dict(ranks[rank][1]["report"], skip_bad_records))
    for path in inputs:  # what iter_documents refuses in one process
        if report.docs.get(str(path), 0) == 0:
            raise DataError(f"{path}: no documents (empty input)")
    dtype = np.dtype(identity["dtype"])
    streams = [_part_documents(root / name, record, dtype) for name, record in ranks.values()]

    def numbered() -> Iterator[tuple[int, Document, np.ndarray]]:
        for index, (_, document, ids) in enumerate(heapq.merge(*streams, key=lambda item: item[0])):
            yield index, document, ids

    manifest = pack_documents(out, identity, numbered(), report, progress)
    if not keep_parts:
        shutil.rmtree(root)
    return manifest
