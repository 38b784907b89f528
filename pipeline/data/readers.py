"""Input readers for `sgtm data shard`: jsonl, plain text, parquet, and `datasets` saved to disk.

Every reader yields `Document`s in a deterministic order, which is what makes sharding restartable
(a restart skips the documents the manifest already accounts for) and splittable: each document
carries its position (input file index, record index), and a `want` predicate over positions lets a
rank parse and return only its own records (see :mod:`pipeline.data.distributed_prep`).

A *record* is one raw unit of an input: a line of a jsonl file (blank lines included, so record i
is line i+1), one `<|endoftext|>`-separated chunk of a text file, one row of a parquet file or of a
`datasets` dataset (splits in name order). Bad records (null/missing text, bad JSON, invalid UTF-8)
are a one-line `DataError` naming the file and line, or, with a `ReadReport(skip_bad=True)`, are
counted per file and kind and skipped.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.errors import DataError

TEXT_SEPARATOR = "<|endoftext|>"
MAX_META_CHARS = 300
BAD_KINDS = ("missing_text", "bad_json", "invalid_utf8")
MAX_EXAMPLES = 5  # bad-record messages kept for the report


@dataclass
class Document:
    key: str  # stable id from the input ('id' or 'title' field, else file:line); used for held-out split
    text: str
    meta: dict[str, str] = field(default_factory=dict)  # other short string fields (topic, lang, ...)
    position: tuple[int, int] = (-1, -1)  # (input file index, record index) in the inputs given


class BadRecord(DataError):
    """One bad input record; `kind` is one of BAD_KINDS. Raised as is (a one-line DataError naming the
    file and line) unless the reader counts and skips bad records."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ReadReport:
    """What a read saw, per input file: records, documents, and (with skip_bad) skipped bad records.

    Mergeable (`add`): a split read's per-rank reports sum to the report of one process reading all."""

    skip_bad: bool = False
    docs: dict[str, int] = field(default_factory=dict)  # file -> documents returned
    bad: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> kind -> count
    # The first bad records as [file index, record index, message], in input order.
    examples: list[list] = field(default_factory=list)

    def count_bad(self, path: str, position: tuple[int, int], exc: BadRecord) -> None:
        per_file = self.bad.setdefault(path, dict.fromkeys(BAD_KINDS, 0))
        per_file[exc.kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append([*position, str(exc)])

    def add(self, other: ReadReport) -> None:
        """Sum another (disjoint) read of the same inputs into this one."""
        for path, n in other.docs.items():
            self.docs[path] = self.docs.get(path, 0) + n
        for path, counts in other.bad.items():
            mine = self.bad.setdefault(path, dict.fromkeys(BAD_KINDS, 0))
            for kind, n in counts.items():
                mine[kind] += n
        self.examples = sorted(self.examples + other.examples)[:MAX_EXAMPLES]

    def totals(self) -> dict[str, int]:
        return {k: sum(f.get(k, 0) for f in self.bad.values()) for k in BAD_KINDS}

    def to_dict(self) -> dict:
        return {"docs": self.docs, "bad": self.bad, "examples": self.examples}

    @classmethod
    def from_dict(cls, raw: dict, skip_bad: bool) -> ReadReport:
        return cls(skip_bad, dict(raw["docs"]), {k: dict(v) for k, v in raw["bad"].items()},
                   [list(e) for e in raw["examples"]])

    def manifest_entry(self) -> dict:
        """What the shard manifest records about skipped records (only with --skip-bad-records)."""
        return {"total": self.totals(), "files": {p: c for p, c in self.bad.items() if any(c.values())},
                "first": [e[2] for e in self.examples]}

    def summary(self) -> str:
        """One line: 'skipped N bad records (missing_text a, bad_json b, invalid_utf8 c); first: ...'."""
        totals = self.totals()
        n = sum(totals.values())
        if n == 0:
            return "no bad records"
        first = f"; first: {self.examples[0][2]}" if self.examples else ""
        return f"skipped {n} bad records ({', '.join(f'{k} {v}' for k, v in totals.items())}){first}"


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
        got = "missing" if "text" not in record else "null" if text is None else type(text).__name__
        raise BadRecord("missing_text", f"{where}: expected a string field 'text' (got {got})")
    key = record.get("id", record.get("title", fallback_key))
    meta = {k: v[:MAX_META_CHARS] for k, v in record.items() if k != "text" and isinstance(v, str)}
    return Document(key=str(key), text=text, meta=meta)


# Bytes that are not UTF-8 decode to lone surrogates U+DC80..U+DCFF under 'surrogateescape';
# valid UTF-8 never produces them, so one found in a raw line marks an invalid byte.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _check_utf8(path: Path, lineno: int, line: str) -> None:
    """Invalid UTF-8 is one line naming the file and line, not a bare UnicodeDecodeError (which
    names neither, and which a text-mode reader raises per block, not per line)."""
    bad = _BAD_BYTE.search(line)
    if bad is not None:
        raise BadRecord("invalid_utf8", f"{path}:{lineno}: invalid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} "
                                        f"at column {bad.start() + 1}); inputs must be UTF-8 text")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, raw line) of a text input (.xz/.gz decompressed, universal newlines); bytes that
    are not UTF-8 come through as lone surrogates for `_check_utf8`, so one bad line cannot stop a
    reader that skips it (or that is not its owner)."""
    name = str(path)
    opener = lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as handle:
        yield from enumerate(handle, 1)


# A reader yields (record index, parse) for the wanted records; parse() returns the record's Document,
# None (nothing there: a blank line or an empty chunk), or raises BadRecord.
Parse = Callable[[], "Document | None"]
Want = Callable[[int], bool]


def _parse_jsonl_line(path: Path, lineno: int, line: str) -> Document | None:
    _check_utf8(path, lineno, line)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord("bad_json", f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise BadRecord("bad_json", f"{path}:{lineno}: expected a JSON object per line")
    return _from_record(record, f"{path.name}:{lineno}", f"{path}:{lineno}")


def _read_jsonl(path: Path, want: Want) -> Iterator[tuple[int, Parse]]:
    for lineno, line in _lines(path):
        if want(lineno - 1):
            yield lineno - 1, lambda lineno=lineno, line=line: _parse_jsonl_line(path, lineno, line)


def _read_text(path: Path, want: Want) -> Iterator[tuple[int, Parse]]:
    """Documents separated by lines holding only <|endoftext|>; without separators, the file is one."""

    def parse(index: int, lines: list[tuple[int, str]]) -> Document | None:
        for lineno, line in lines:
            _check_utf8(path, lineno, line)
        text = "".join(line for _, line in lines)
        return Document(key=f"{path.name}:{index}", text=text.strip("\n")) if text.strip() else None

    lines: list[tuple[int, str]] = []
    index = 0
    for lineno, line in _lines(path):
        if line.strip() == TEXT_SEPARATOR:
            if want(index):
                yield index, lambda index=index, lines=lines: parse(index, lines)
            index += 1
            lines = []
        elif want(index):
            lines.append((lineno, line))
    if want(index):
        yield index, lambda: parse(index, lines)


def _read_parquet(path: Path, want: Want) -> Iterator[tuple[int, Parse]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path}: expected a column 'text', found {table.schema_arrow.names}")
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        if not any(want(i) for i in range(row, row + batch.num_rows)):  # a rank skips others' rows unread
            row += batch.num_rows
            continue
        for record in batch.to_pylist():
            if want(row):
                yield row, lambda record=record, row=row: _from_record(
                    record, f"{path.name}:{row}", f"{path} row {row}")
            row += 1


def _read_datasets(path: Path, want: Want) -> Iterator[tuple[int, Parse]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = (
        [(name, loaded[name]) for name in sorted(loaded)]
        if isinstance(loaded, datasets.DatasetDict)
        else [("", loaded)]
    )
    index = 0
    for split, dataset in splits:
        if "text" not in dataset.column_names:
            raise DataError(f"{path}: expected a column 'text', found {dataset.column_names}")
        for row, record in enumerate(dataset):
            if want(index):
                yield index, lambda record=record, row=row, split=split: _from_record(
                    record, f"{path.name}:{split}{row}", f"{path} {split} row {row}")
            index += 1


READERS = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet, "datasets": _read_datasets}


def _all(_: int) -> bool:
    return True


def iter_documents(
    paths: list[str],
    report: ReadReport | None = None,
    want: Callable[[int, int], bool] | None = None,
) -> Iterator[Document]:
    """All documents of all inputs in order; empty texts are skipped.

    `want(file_index, record_index)`: read only those records (the others are not parsed, decoded
    or checked); then an input without documents is left to the caller (the merge) to refuse.
    `report`: filled with per-file record/document counts and, if `report.skip_bad`, bad records
    (counted and skipped instead of raised). Without `want`, an input with no documents is an error.
    """
    kinds = [input_kind(p) for p in paths]  # fail on a bad type before doing any work
    report = report if report is not None else ReadReport()
    for file_index, (path, kind) in enumerate(zip(paths, kinds, strict=True)):
        count = 0
        select = _all if want is None else (lambda i, f=file_index: want(f, i))
        for record_index, parse in READERS[kind](Path(path), select):
            try:
                document = parse()
            except BadRecord as exc:
                if not report.skip_bad:
                    raise
                report.count_bad(str(path), (file_index, record_index), exc)
                continue
            if document is not None and document.text.strip():
                document.position = (file_index, record_index)
                count += 1
                yield document
        report.docs[str(path)] = report.docs.get(str(path), 0) + count
        if count == 0 and want is None:
            raise DataError(f"{path}: no documents (empty input)")
