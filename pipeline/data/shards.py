"""Webdataset shards of packed token sequences, their manifest, and a validating reader.

On disk, a source is a directory: `manifest.json` plus `<source>-NNNNN.tar`. Each tar sample is
one packed sequence of exactly seq_len+1 tokens (the last sample of a shard may be shorter):

    <key>.tokens.npy   uint16 (uint32 if the vocabulary needs it) token ids
    <key>.meta.json    {"source", "pieces": [[doc_index, offset_in_doc, n_tokens], ...],
                        "boundaries": [0, ...cumulative piece starts..., n_tokens],
                        "docs": {doc_index: {"key", "n_tokens", "meta"}}}   # docs starting here

Every document ends with the tokenizer's end-of-text id. A document may continue into the next
sample, never into the next shard, so each shard is self-contained: the loader can split shards
across ranks/workers and re-assemble whole documents (it re-packs after filtering, see docs/data.md).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from pipeline.data.errors import DataError
from pipeline.data.io import atomic_write_json, sha256_file
from pipeline.data.readers import Document, ReadReport, iter_documents
from pipeline.data.tokenizer import TextTokenizer

FORMAT = "sgtm-shards/1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class ShardDocument:
    """A whole document re-assembled from a shard."""

    doc_index: int  # position of the document in its source (0-based, input order)
    key: str
    meta: dict
    tokens: np.ndarray  # ends with eot


# ----------------------------------------------------------------------------------------------- writer


class _ShardWriter:
    """Packs documents into seq_len+1 samples and rolls shards over at document boundaries."""

    def __init__(
        self, out: Path, source: str, seq_len: int, dtype: np.dtype, shard_bytes: int, manifest: dict
    ) -> None:
        self.out, self.source, self.sample_len, self.dtype = out, source, seq_len + 1, dtype
        self.shard_bytes, self.manifest = shard_bytes, manifest
        self.pieces: list[tuple[int, int, np.ndarray]] = []
        self.starts: dict[str, dict] = {}
        self.fill = 0
        self.writer: wds.TarWriter | None = None
        self.tmp_path: Path | None = None
        self.stats = {"samples": 0, "tokens": 0, "docs": 0, "first_doc": None, "bytes": 0}

    def add(self, doc_index: int, document: Document, tokens: np.ndarray) -> None:
        if self.stats["first_doc"] is None:
            self.stats["first_doc"] = doc_index
        self.starts[str(doc_index)] = {
            "key": document.key,
            "n_tokens": int(len(tokens)),
            "meta": document.meta,
        }
        offset = 0
        while offset < len(tokens):
            take = min(len(tokens) - offset, self.sample_len - self.fill)
            self.pieces.append((doc_index, offset, tokens[offset : offset + take]))
            self.fill += take
            offset += take
            if self.fill == self.sample_len:
                self._emit_sample()
        self.stats["docs"] += 1
        if self.stats["bytes"] >= self.shard_bytes:
            self.close_shard()

    def _emit_sample(self) -> None:
        if not self.pieces:
            return
        if self.writer is None:
            self.tmp_path = self.out / f".{self._shard_name()}.tmp"
            self.writer = wds.TarWriter(str(self.tmp_path), mtime=0)
        tokens = np.concatenate([p[2] for p in self.pieces]).astype(self.dtype)
        lengths = [len(p[2]) for p in self.pieces]
        meta = {
            "source": self.source,
            "pieces": [[d, o, n] for (d, o, _), n in zip(self.pieces, lengths, strict=True)],
            "boundaries": np.concatenate([[0], np.cumsum(lengths)]).tolist(),
            "docs": self.starts,
        }
        buffer = io.BytesIO()
        np.save(buffer, tokens, allow_pickle=False)
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        key = f"{len(self.manifest['shards']):05d}-{self.stats['samples']:06d}"
        self.writer.write({"__key__": key, "tokens.npy": buffer.getvalue(), "meta.json": meta_bytes})
        self.stats["samples"] += 1
        self.stats["tokens"] += int(len(tokens))
        self.stats["bytes"] += len(buffer.getvalue()) + len(meta_bytes) + 2048
        self.pieces, self.starts, self.fill = [], {}, 0

    def _shard_name(self) -> str:
        return f"{self.source}-{len(self.manifest['shards']):05d}.tar"

    def close_shard(self) -> None:
        """Flush the partial sample, rename the temp tar into place, then record it in the manifest."""
        self._emit_sample()
        if self.writer is None:
            return
        self.writer.close()
        final = self.out / self._shard_name()
        os.replace(self.tmp_path, final)
        entry = {
            "name": final.name,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
            "samples": self.stats["samples"],
            "tokens": self.stats["tokens"],
            "docs": self.stats["docs"],
            "first_doc": self.stats["first_doc"],
        }
        self.manifest["shards"].append(entry)
        atomic_write_json(self.out / MANIFEST, self.manifest)
        self.writer, self.tmp_path = None, None
        self.stats = {"samples": 0, "tokens": 0, "docs": 0, "first_doc": None, "bytes": 0}


def shard_identity(
    inputs: list[str],
    tokenizer: TextTokenizer,
    seq_len: int,
    source: str | None = None,
    shard_size_mb: float = 16.0,
) -> dict:
    """What decides the shards' bytes (checked before any work; one-line errors naming the flag).

    A restart, every rank of a split run and its merge must all present the same identity."""
    if not inputs:
        raise DataError("--input: expected at least one file")
    if seq_len < 1:
        raise DataError(f"--seq-len: expected a positive integer, got {seq_len}")
    if shard_size_mb <= 0:
        raise DataError(f"--shard-size-mb: expected a positive number, got {shard_size_mb}")
    from pipeline.data.readers import input_kind

    for path in inputs:  # unknown type / missing file: fail before any work
        input_kind(path)
    source = source or Path(inputs[0]).name.split(".")[0]
    if not source.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"--source: expected letters, digits, '-' or '_', got {source!r}")
    return {
        "format": FORMAT,
        "source": source,
        "seq_len": seq_len,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "tokenizer": {
            "spec": tokenizer.spec,
            "hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
        },
        "inputs": [{"path": str(Path(p).resolve()), "bytes": _input_size(p)} for p in inputs],
        "shard_size_mb": shard_size_mb,
    }


def existing_manifest(out: Path, identity: dict) -> dict | None:
    """The manifest already under `out` (None if there is none); one made differently is refused."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        return None
    old = json.loads(manifest_path.read_text())
    differing = [k for k in identity if old.get(k) != identity[k]]
    if differing:
        raise DataError(
            f"{manifest_path}: existing shards were made with different {differing}; use a fresh --out directory"
        )
    return old


def tokenized(
    documents: Iterator[Document], tokenizer: TextTokenizer, skip: int = 0
) -> Iterator[tuple[int, Document, np.ndarray]]:
    """(index, document, tokens + eot) in input order, tokenized in batches; the first `skip`
    documents are passed over without tokenizing them (a restart)."""
    batch: list[tuple[int, Document]] = []

    def flush() -> Iterator[tuple[int, Document, np.ndarray]]:
        ids = tokenizer.encode_batch([d.text for _, d in batch])
        for (index, document), tokens in zip(batch, ids, strict=True):
            yield index, document, np.asarray(tokens + [tokenizer.eot_id], dtype=np.int64)
        batch.clear()

    for index, document in enumerate(documents):
        if index < skip:
            continue
        batch.append((index, document))
        if len(batch) == 512:
            yield from flush()
    if batch:
        yield from flush()


def pack_documents(
    out: Path,
    identity: dict,
    stream: Iterator[tuple[int, Document, np.ndarray]],
    report: ReadReport | None = None,
    progress: bool = True,
) -> dict:
    """Pack (index, document, tokens) items, all of them from the manifest's document count on, into
    shards and write the complete manifest. The one writer behind both `write_shards` and the merge
    of a split run, which is why their outputs are byte-identical."""
    manifest = existing_manifest(out, identity) or {**identity, "shards": [], "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()
    done_docs = sum(s["docs"] for s in manifest["shards"])
    writer = _ShardWriter(
        out, identity["source"], identity["seq_len"], np.dtype(identity["dtype"]),
        int(identity["shard_size_mb"] * 1e6), manifest,
    )
    from tqdm import tqdm

    bar = tqdm(desc=f"shard {identity['source']}", unit=" docs", disable=not progress, initial=done_docs)
    for index, document, tokens in stream:
        if index < done_docs:
            continue
        writer.add(index, document, tokens)
        bar.update(1)
    writer.close_shard()
    bar.close()
    manifest["complete"] = True
    manifest["totals"] = {k: sum(s[k] for s in manifest["shards"]) for k in ("docs", "tokens", "samples")}
    if report is not None and report.skip_bad:
        manifest["bad_records"] = report.manifest_entry()
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def write_shards(
    inputs: list[str],
    tokenizer: TextTokenizer,
    seq_len: int,
    out: str | os.PathLike,
    source: str | None = None,
    shard_size_mb: float = 16.0,
    progress: bool = True,
    skip_bad_records: bool = False,
) -> dict:
    """Tokenize inputs into shards under `out`; restartable: completed shards are kept and skipped.

    The manifest is rewritten (atomically) after every shard, so a crash loses at most the shard in
    progress; a restart with the same arguments re-reads the inputs, skips the documents already in
    shards without tokenizing them, and continues. `skip_bad_records`: count bad input records
    (null/missing text, bad JSON, invalid UTF-8) in the manifest's `bad_records` instead of failing.
    """
    out = Path(out)
    identity = shard_identity(inputs, tokenizer, seq_len, source, shard_size_mb)
    old = existing_manifest(out, identity)
    if old is not None and old.get("complete"):
        return old
    done_docs = sum(s["docs"] for s in old["shards"]) if old else 0
    report = ReadReport(skip_bad=skip_bad_records)
    stream = tokenized(iter_documents(inputs, report), tokenizer, skip=done_docs)
    return pack_documents(out, identity, stream, report, progress)


def _input_size(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else -1


# ----------------------------------------------------------------------------------------------- reader


def load_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a shard directory, checked for completeness (one-line errors naming it)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: no shard manifest (run `sgtm data shard --out {directory}` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: expected format {FORMAT!r}, got {manifest.get('format')!r}")
    if not manifest.get("complete"):
        raise DataError(f"{path}: sharding did not finish (re-run the same `sgtm data shard` to complete it)")
    return manifest


def check_tokenizer(manifest: dict, directory: str | os.PathLike, tokenizer: TextTokenizer) -> None:
    if manifest["tokenizer"]["hash"] != tokenizer.hash:
        raise DataError(
            f"{Path(directory) / MANIFEST}: tokenizer hash {manifest['tokenizer']['hash'][:12]} "
            f"({manifest['tokenizer']['spec']}) differs from the configured tokenizer {tokenizer.spec!r} "
            f"({tokenizer.hash[:12]})"
        )


def _safe_name(name: str) -> str:
    if name.startswith("/") or os.path.isabs(name) or ".." in Path(name).parts:
        raise DataError(f"unsafe tar member name {name!r} (absolute path or '..')")
    return name


def iter_shard_samples(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, tokens, meta) per sample, through webdataset's tar iterator; corrupt data -> DataError."""
    path = Path(path)
    current_key, parts = None, {}

    def finish() -> tuple[str, np.ndarray, dict]:
        if set(parts) != {"tokens.npy", "meta.json"}:
            raise DataError(
                f"{path}: sample {current_key} has members {sorted(parts)}, expected tokens.npy and meta.json"
            )
        tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
        return current_key, tokens, json.loads(parts["meta.json"])

    try:
        with open(path, "rb") as handle:
            for member in tar_file_iterator(handle, rename_files=_safe_name):
                key, _, suffix = member["fname"].rpartition("/")[2].partition(".")
                if key != current_key:
                    if current_key is not None:
                        yield finish()
                    current_key, parts = key, {}
                parts[suffix] = member["data"]
            if current_key is not None:
                yield finish()
    except DataError as exc:
        raise DataError(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc)) from None
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, json.JSONDecodeError) as exc:
        detail = str(exc).split(" @ ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: corrupt or truncated shard ({detail})") from None


def iter_shard_documents(path: str | os.PathLike, entry: dict | None = None) -> Iterator[ShardDocument]:
    """Whole documents of one shard, in order; checks the shard against its manifest entry."""
    path = Path(path)
    if entry is not None:
        if not path.exists():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(
                f"{path}: corrupt or truncated shard ({size} bytes, manifest says {entry['bytes']})"
            )
    open_doc: dict | None = None
    samples = docs = 0
    for key, tokens, meta in iter_shard_samples(path):
        samples += 1
        boundaries = meta.get("boundaries", [])
        if not boundaries or boundaries[-1] != len(tokens) or len(boundaries) != len(meta["pieces"]) + 1:
            raise DataError(
                f"{path}: corrupt sample {key} (boundaries do not match its {len(tokens)} tokens)"
            )
        for (doc_index, offset, n), start in zip(meta["pieces"], boundaries, strict=False):
            piece = tokens[start : start + n]
            if offset == 0:
                if open_doc is not None:
                    raise DataError(
                        f"{path}: corrupt sample {key} (document {open_doc['index']} is cut short)"
                    )
                info = meta["docs"][str(doc_index)]
                open_doc = {"index": doc_index, "info": info, "parts": [], "filled": 0}
            elif open_doc is None or open_doc["index"] != doc_index or open_doc["filled"] != offset:
                raise DataError(f"{path}: corrupt sample {key} (piece of document {doc_index} out of order)")
            open_doc["parts"].append(piece)
            open_doc["filled"] += n
            if open_doc["filled"] == open_doc["info"]["n_tokens"]:
                docs += 1
                info = open_doc["info"]
                yield ShardDocument(
                    doc_index,
                    info["key"],
                    info.get("meta", {}),
                    np.concatenate(open_doc["parts"]) if len(open_doc["parts"]) > 1 else open_doc["parts"][0],
                )
                open_doc = None
    if open_doc is not None:
        raise DataError(f"{path}: corrupt or truncated shard (ends inside document {open_doc['index']})")
    if entry is not None and (samples, docs) != (entry["samples"], entry["docs"]):
        raise DataError(
            f"{path}: corrupt or truncated shard ({samples} samples/{docs} docs, "
            f"manifest says {entry['samples']}/{entry['docs']})"
        )
