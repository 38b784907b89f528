"""Input readers for `sgtm data shard`: jsonl, plain text, parquet, and `datasets` saved to disk.

Every reader yields `Document`s in a deterministic order, which is what makes sharding restartable
(a restart skips the documents the manifest already accounts for).
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.errors import DataError

TEXT_SEPARATOR = "<|endoftext|>"
MAX_META_CHARS = 300


@dataclass
class Document:
    key: str  # stable id from the input ('id' or 'title' field, else file:line); used for held-out split
    text: str
    meta: dict[str, str] = field(default_factory=dict)  # other short string fields (topic, lang, ...)


def _strip_compression(name: str) -> str:
    for suffix in (".xz", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def input_kind(path: str | os.PathLike) -> str:
    """'jsonl' | 'text' | 'parquet' | 'datasets', or a DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        raise DataError(f"{path}: directory is not a `datasets` dataset saved with save_to_disk")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = _strip_compression(path.name.lower())
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".txt", ".text")):
        return "text"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(
        f"{path}: unknown input type (expected .jsonl, .txt, .parquet, optionally .xz/.gz, "
        "or a directory written by datasets' save_to_disk)"
    )


def _from_record(record: dict, fallback_key: str, where: str) -> Document:
    text = record.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: expected a string field 'text'")
    key = record.get("id", record.get("title", fallback_key))
    meta = {k: v[:MAX_META_CHARS] for k, v in record.items() if k != "text" and isinstance(v, str)}
    return Document(key=str(key), text=text, meta=meta)


# Bytes that are not UTF-8 decode to lone surrogates U+DC80..U+DCFF under 'surrogateescape';
# valid UTF-8 never produces them, so one found in a raw line marks an invalid byte.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text input (.xz/.gz decompressed, universal newlines); invalid
    UTF-8 is a one-line DataError naming the file and line, not a bare UnicodeDecodeError (which
    names neither, and which a text-mode reader raises per block, not per line)."""
    name = str(path)
    opener = lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, 1):
            bad = _BAD_BYTE.search(line)
            if bad is not None:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} "
                                f"at column {bad.start() + 1}); inputs must be UTF-8 text")
            yield lineno, line


def _read_jsonl(path: Path) -> Iterator[Document]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        yield _from_record(record, f"{path.name}:{lineno}", f"{path}:{lineno}")


def _read_text(path: Path) -> Iterator[Document]:
    """Documents separated by lines holding only <|endoftext|>; without separators, the file is one."""
    lines: list[str] = []
    index = 0
    for _, line in _lines(path):
        if line.strip() == TEXT_SEPARATOR:
            if "".join(lines).strip():
                yield Document(key=f"{path.name}:{index}", text="".join(lines).strip("\n"))
            index += 1
            lines = []
        else:
            lines.append(line)
    if "".join(lines).strip():
        yield Document(key=f"{path.name}:{index}", text="".join(lines).strip("\n"))


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path}: expected a column 'text', found {table.schema_arrow.names}")
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _from_record(record, f"{path.name}:{row}", f"{path} row {row}")
            row += 1


def _read_datasets(path: Path) -> Iterator[Document]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = (
        [(name, loaded[name]) for name in sorted(loaded)]
        if isinstance(loaded, datasets.DatasetDict)
        else [("", loaded)]
    )
    for split, dataset in splits:
        if "text" not in dataset.column_names:
            raise DataError(f"{path}: expected a column 'text', found {dataset.column_names}")
        for row, record in enumerate(dataset):
            yield _from_record(record, f"{path.name}:{split}{row}", f"{path} {split} row {row}")


READERS = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet, "datasets": _read_datasets}


def iter_documents(paths: list[str]) -> Iterator[Document]:
    """All documents of all inputs in order; empty texts are skipped; an input with none is an error."""
    kinds = [input_kind(p) for p in paths]  # fail on a bad type before doing any work
    for path, kind in zip(paths, kinds, strict=True):
        count = 0
        for document in READERS[kind](Path(path)):
            if document.text.strip():
                count += 1
                yield document
        if count == 0:
            raise DataError(f"{path}: no documents (empty input)")
