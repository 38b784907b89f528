"""Streaming loader: shards -> documents -> tags/filter -> weighted mix -> shuffle -> re-pack -> batches.

Why re-pack: the filter policy drops whole documents (or, at paragraph granularity, the tagged
spans inside them) and tags are per document, so packing must come after filtering. Shards keep
their packed seq_len+1 samples on disk; the loader re-assembles documents from them, decides each
document's (or paragraph's) mode (tags + thresholds or the noise simulator), drops what the policy
drops (:func:`apply_filter`), and packs the survivors into sequences of `seq_len + 1` tokens.

Determinism: the stream of one (dp rank, worker) *slot* is a pure function of (seed, slot, number
of slots, config). Each epoch of a source has one shard order, a permutation seeded by (seed,
source, epoch) whatever the layout, dealt round-robin to the slots; source choice and the shuffle
buffer use RNGs seeded by (seed, slot); per-document draws (noise, retain sampling, held-out split)
hash the document id.

Exact resume in constant time: a slot's state at a batch boundary is positions, not counts: per
source the epoch, the shard reached and the documents passed in it; the RNG states of the mix and
the shuffle; the shuffle buffer as document references (source, shard, document, first token); the
packer's cut document (the only packer state at a row end). Restoring re-reads the referenced
documents and opens each source's current shard: O(shuffle_buffer + one shard per source),
whatever the step. With DataLoader workers every batch carries its slot's state, so the main
process holds the state matching what it delivered, and the round-robin over workers is rotated
so the next batch comes from the worker that was next.

Elastic resume: `load_global_state` takes every rank's state; on another DP size or worker count
:func:`reshard_slots` deals what the old slots had still to read in the epochs they had begun, and
the documents they held undelivered, to the new slots (docs/reliability.md defines the guarantee).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.codes import Mode, TrueLabel, mode_name
from pipeline.data.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.labels import check_role, is_heldout, true_code
from pipeline.data.shards import ShardDocument, check_tokenizer, iter_shard_documents, load_manifest
from pipeline.data.tagging import (
    SUMMARY,
    Confusion,
    DocModes,
    ModeAssigner,
    false_positive_rate_for_precision,
    load_sidecar,
    newline_tables,
    paragraph_spans,
)
from pipeline.data.tokenizer import load_tokenizer

STATE_VERSION = 2
IGNORE_INDEX = -100


@dataclass
class _Doc:
    tokens: np.ndarray
    modes: np.ndarray | int  # per-token modes (paragraph spans) or one mode for the document
    true_code: int
    source_id: int
    doc_index: int
    shard: int = -1  # manifest index of the shard it was read from
    start: int = 0  # first token to pack (> 0: the rest of a document cut at a row end)
    # True where a filter dropped the span before this token: the token is never the target of
    # the one packed before it (that pair is not in the document).
    cuts: np.ndarray | None = None

    def ref(self) -> list[int]:
        """What a loader state stores for this document (it is read again on restore)."""
        return [self.source_id, self.shard, self.doc_index, self.start]


@dataclass
class _SourcePlan:
    name: str
    path: str
    shards: list[dict]  # manifest entries
    weight: float
    mean_doc_tokens: float
    tags: str | None
    true_label: str | None


@dataclass
class _Plan:
    """Everything a worker needs, picklable (workers are forked or spawned with it)."""

    cfg: DataConfig
    sources: list[_SourcePlan]
    pad_id: int
    false_positive_rate: float
    # [vocab, 3] newline table (tagging.newline_tables): the simulated source's paragraphs at
    # paragraph granularity are found in token space, as `sgtm data tag` finds the classifier's.
    newlines: np.ndarray | None = None


def build_plan(cfg: DataConfig) -> _Plan:
    """Open manifests, check tokenizer hashes, tags and truth up front (one-line errors naming files)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    sources = []
    for i, src in enumerate(cfg.sources):
        manifest = load_manifest(src.path)
        check_tokenizer(manifest, src.path, tokenizer)
        if src.tags is not None:
            summary_path = Path(src.tags) / SUMMARY
            if not summary_path.exists():
                raise DataError(f"{summary_path}: no tags summary (run `sgtm data tag --out {src.tags}`)")
            summary = json.loads(summary_path.read_text())
            expected = {e["name"]: e["sha256"] for e in manifest["shards"]}
            if summary.get("shards") != expected:
                raise DataError(
                    f"{summary_path}: tags do not match the shards in {src.path} "
                    "(re-run `sgtm data tag` on these shards)"
                )
        elif src.true_label is None and cfg.tagging.source == "simulated":
            raise DataError(
                f"data.sources[{i}]: no ground truth for the noise simulator "
                "(set true_label, or tags from `sgtm data tag --labels ...`)"
            )
        totals = manifest["totals"]
        sources.append(
            _SourcePlan(
                manifest["source"],
                src.path,
                manifest["shards"],
                src.weight,
                totals["tokens"] / max(1, totals["docs"]),
                src.tags,
                src.true_label,
            )
        )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: two sources share a name {names} (use --source when sharding)")
    fpr = cfg.tagging.false_positive_rate
    if cfg.tagging.source == "simulated" and cfg.tagging.precision is not None:
        n_forget, n_other = _count_true_roles(cfg, sources)
        fpr = false_positive_rate_for_precision(
            cfg.tagging.precision, 1 - cfg.tagging.undiscovered_rate, n_forget, n_other
        )
    newlines = None
    if cfg.tagging.source == "simulated" and cfg.tagging.granularity == "paragraph":
        newlines = newline_tables(tokenizer)
    return _Plan(cfg, sources, tokenizer.eot_id, fpr, newlines)


def _count_true_roles(cfg: DataConfig, sources: list[_SourcePlan]) -> tuple[int, int]:
    """Documents that are truly forget / not, from source true labels or the tags summaries."""
    n_forget = n_other = 0
    for src in sources:
        if src.true_label is not None:
            docs = sum(e["docs"] for e in src.shards)
            if src.true_label.startswith("forget:"):
                n_forget += docs
            else:
                n_other += docs
            continue
        confusion = json.loads((Path(src.tags) / SUMMARY).read_text()).get("confusion", {})
        for role, row in confusion.items():
            docs = sum(cell["docs"] for cell in row.values())
            if role.startswith("forget:"):
                n_forget += docs
            else:
                n_other += docs
    return n_forget, n_other


# --------------------------------------------------------------------------------------- per-slot stream


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def fresh_items(plan: _Plan, seed: int, source_id: int, epoch: int, slot: int, n_slots: int) -> list[list[int]]:
    """The shards slot `slot` of `n_slots` reads from a source in one epoch: [[shard, first doc], ...].

    The epoch's shard order is a permutation seeded by (seed, source, epoch) alone, so it is the
    same for every layout; a layout only decides how it is dealt (`order[slot::n_slots]`)."""
    order = _rng(seed, 11, source_id, epoch).permutation(len(plan.sources[source_id].shards))
    return [[int(i), 0] for i in order[slot::n_slots]]


class _SourceCursor:
    """Where one slot stands in one source: the plan of the epoch being read (shards in order, each
    with the first document to read), the shard reached (`k`) and how many of its documents were
    passed (`doc`), and plans queued by a reshard. A state is these integers: restoring opens one
    shard and passes `doc` documents, whatever the position in the run."""

    def __init__(self, stream: _SlotStream, source_id: int, state: dict) -> None:
        self.stream, self.source_id = stream, source_id
        self.src = stream.plan.sources[source_id]
        self.epoch: int = state["epoch"]
        self.items: list[list[int]] | None = state["items"]  # None: this slot's share of the permutation
        self.k: int = state["k"]
        self.doc: int = state["doc"]
        self.seen: int = state["seen"]
        self.queue: list[list] = [list(q) for q in state["queue"]]  # [[epoch, items], ...] from a reshard
        self.next_epoch: int = state["next_epoch"]  # the first epoch after the queue (fresh plans)
        self.done: bool = state["done"]
        self._plan_items = self._resolve(self.items, self.epoch)
        self._open: Iterator[tuple[Any, dict | None]] | None = None

    @staticmethod
    def initial(plan: _Plan, epochs: int | None) -> dict:
        return {"epoch": 0, "items": None, "k": 0, "doc": 0, "seen": 0, "queue": [], "next_epoch": 1,
                "done": epochs is not None and epochs < 1}

    def state(self) -> dict:
        return {"epoch": self.epoch, "items": self.items, "k": self.k, "doc": self.doc, "seen": self.seen,
                "queue": self.queue, "next_epoch": self.next_epoch, "done": self.done}

    def _resolve(self, items: list[list[int]] | None, epoch: int) -> list[list[int]]:
        s = self.stream
        return fresh_items(s.plan, s.seed, self.source_id, epoch, s.slot, s.n_slots) if items is None else items

    def _next_plan(self) -> None:
        if self.items is None and self.seen == 0:
            self.done = True  # nothing readable for this slot in a whole epoch: stop instead of spinning
            return
        if self.queue:
            self.epoch, self.items = self.queue.pop(0)
        else:
            epochs = self.stream.cfg.epochs
            if epochs is not None and self.next_epoch >= epochs:
                self.done = True
                return
            self.epoch, self.items = self.next_epoch, None
            self.next_epoch += 1
        self._plan_items = self._resolve(self.items, self.epoch)
        self.k = self.doc = self.seen = 0

    def _read(self, shard: int, skip: int) -> Iterator[tuple[Any, dict | None]]:
        entry = self.src.shards[shard]
        tags = load_sidecar(self.src.tags, entry) if self.src.tags is not None else None
        for i, doc in enumerate(iter_shard_documents(Path(self.src.path) / entry["name"], entry)):
            if i >= skip:
                yield doc, tags

    def next(self) -> _Doc | None:
        """The next document (None: read, but not in this split or dropped by the policy);
        StopIteration once this source is exhausted for this slot (finite epochs)."""
        while not self.done:
            if self._open is None:
                if self.k >= len(self._plan_items):
                    self._next_plan()
                    continue
                shard, first = self._plan_items[self.k]
                self.doc = max(self.doc, first)
                self._open = self._read(shard, self.doc)
            shard = self._plan_items[self.k][0]
            try:
                raw, tags = next(self._open)
                made = self.stream._make_doc(self.source_id, self.src, raw, tags)
            except StopIteration:
                self._open, self.k, self.doc = None, self.k + 1, 0
                continue
            except DataError as exc:
                if not self.stream.cfg.skip_bad_shards:
                    raise
                self.stream.skipped.append(str(exc))
                self._open, self.k, self.doc = None, self.k + 1, 0
                continue
            self.doc += 1
            self.seen += 1
            if made is not None:
                made.shard = shard
            return made
        raise StopIteration


def read_documents(path: Path, entry: dict, doc_indices: Iterable[int]) -> list[ShardDocument]:
    """Some documents of one shard, by seeking (the shard format is in pipeline/data/shards.py):
    the tar headers give every member's offset, the samples' small ``meta.json`` members say
    where each document starts, and only the samples holding the wanted documents are decoded.
    Corrupt data or a document that is not there -> one-line DataError naming the shard."""
    wanted = {int(d) for d in doc_indices}
    if not path.exists():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    if path.stat().st_size != entry["bytes"]:
        raise DataError(f"{path}: corrupt or truncated shard ({path.stat().st_size} bytes, "
                        f"manifest says {entry['bytes']})")
    try:
        with tarfile.open(path, "r:") as tar, open(path, "rb") as handle:
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for info in tar:
                key, _, suffix = info.name.rpartition("/")[2].partition(".")
                members.setdefault(key, {})[suffix] = info

            def read(info: tarfile.TarInfo) -> bytes:
                handle.seek(info.offset_data)
                return handle.read(info.size)

            keys = list(members)
            metas: dict[str, dict] = {}
            starts: dict[int, int] = {}  # document -> position of the sample it starts in
            for position, key in enumerate(keys):
                metas[key] = json.loads(read(members[key]["meta.json"]))
                for doc in metas[key]["docs"]:
                    if int(doc) in wanted:
                        starts[int(doc)] = position
            out = []
            for doc_index in sorted(wanted):
                if doc_index not in starts:
                    raise DataError(f"{path}: loader state names document {doc_index}, not in this shard")
                position, parts, filled = starts[doc_index], [], 0
                info = metas[keys[position]]["docs"][str(doc_index)]
                while filled < info["n_tokens"]:
                    key = keys[position]
                    tokens = np.load(io.BytesIO(read(members[key]["tokens.npy"])), allow_pickle=False)
                    meta = metas[key]
                    for (doc, offset, n), start in zip(meta["pieces"], meta["boundaries"], strict=False):
                        if doc == doc_index and offset == filled:
                            parts.append(tokens[start : start + n])
                            filled += n
                    position += 1
                    if filled < info["n_tokens"] and position >= len(keys):
                        raise DataError(f"{path}: corrupt shard (document {doc_index} is cut short)")
                out.append(ShardDocument(doc_index, info["key"], info.get("meta", {}),
                                         np.concatenate(parts) if len(parts) > 1 else parts[0]))
            return out
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, json.JSONDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: corrupt or truncated shard ({detail})") from None


def apply_filter(
    tokens: np.ndarray, modes: DocModes, policy: str
) -> tuple[np.ndarray, np.ndarray | int, np.ndarray | None] | None:
    """What one training document gives the packer under the filter policy: (tokens, modes, cuts),
    or None when nothing of it is left.

    Without paragraph spans the document is kept or dropped whole (`weak`: forget-tagged; `strict`:
    also adjacent). With spans (paragraph granularity) the filters drop exactly the tokens SGTM
    masks: every forget-tagged span (and under `strict` every adjacent-tagged one) wherever it sits,
    while the other paragraphs of its document stay, so a filter baseline trains on what SGTM's
    retain parameters learn from. `cuts` marks each token that follows a dropped span: the pair
    across the gap is not in the document, so it is never a target."""
    if not modes.spans:
        if policy != "none" and (modes.mode >= Mode.FORGET or (policy == "strict" and modes.adjacent)):
            return None
        return tokens, modes.mode, None
    token_modes = np.full(len(tokens), modes.mode, dtype=np.int64)
    drop = np.zeros(len(tokens), dtype=bool)
    for start, end, mode, adjacent in modes.spans:
        token_modes[start:end] = mode
        drop[start:end] = policy != "none" and (mode >= Mode.FORGET or (policy == "strict" and adjacent))
    if not drop.any():
        return tokens, token_modes, None
    keep = np.flatnonzero(~drop)
    if not len(keep):
        return None
    cuts = np.zeros(len(keep), dtype=bool)
    cuts[1:] = np.diff(keep) > 1
    return tokens[keep], token_modes[keep], cuts


class _SlotStream:
    """The deterministic batch stream of one (dp rank, worker) slot, and its state at a batch boundary.

    The stream is shards -> source cursors -> weighted source mix -> shuffle buffer -> packer ->
    batches. Its state (:meth:`snapshot`) is the cursors' positions, the RNG states of the mix and
    the shuffle, the shuffle buffer as document references and the packer's carried-over document;
    :meth:`__init__` with a state re-reads only the referenced documents (O(buffer), not O(position)).
    """

    def __init__(
        self,
        plan: _Plan,
        slot: int,
        n_slots: int,
        seed: int,
        seq_len: int,
        batch_size: int,
        split: str = "train",
        state: dict | None = None,
    ) -> None:
        self.plan, self.slot, self.n_slots, self.seed = plan, slot, n_slots, seed
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.cfg = plan.cfg
        self.assigner = ModeAssigner(self.cfg.tagging, self.cfg.domains, plan.false_positive_rate)
        state = state if state is not None else initial_slot_state(plan, seed, slot)
        self.generation = int(state["generation"])
        self.skipped: list[str] = list(state["skipped"])
        self.cursors = [_SourceCursor(self, i, c) for i, c in enumerate(state["cursors"])]
        mix = state["mix"]
        self.mix_rng = self.rng(12)
        self.mix_rng.bit_generator.state = mix["rng"]
        self.active: list[int] = list(mix["active"])
        self.picks, self.kept = int(mix["picks"]), int(mix["kept"])
        self.shuffle_rng = self.rng(13)
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.flushing: bool = state["flushing"]
        self.buffer: list[_Doc] = self.read_refs(state["buffer"])
        self.carry: list[_Doc] = self.read_refs(state["carry"])

    def rng(self, stream_id: int) -> np.random.Generator:
        return _slot_rng(self.seed, stream_id, self.slot, self.generation)

    @property
    def epochs(self) -> list[int]:
        return [c.epoch for c in self.cursors]

    def snapshot(self) -> dict:
        """This slot's state now; taken at batch boundaries, where no row is half full. The buffer
        references are one int64 array (cheap to send from a worker); :func:`_plain` makes it JSON."""
        return {
            "generation": self.generation,
            "cursors": [c.state() for c in self.cursors],
            "mix": {"rng": self.mix_rng.bit_generator.state, "active": list(self.active),
                    "picks": self.picks, "kept": self.kept},
            "shuffle_rng": self.shuffle_rng.bit_generator.state,
            "flushing": self.flushing,
            "buffer": np.array([d.ref() for d in self.buffer], dtype=np.int64).reshape(-1, 4),
            "carry": [d.ref() for d in self.carry],
            "skipped": list(self.skipped),
            "done": False,
        }

    def read_refs(self, refs: list) -> list[_Doc]:
        """Documents named by [source, shard, doc_index, start] references, read again from their
        shards by seeking to them (:func:`read_documents`): the cost is the documents, not where
        they sit in their shards."""
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)
        for source_id, shard, doc_index, _ in refs:
            wanted[(int(source_id), int(shard))].add(int(doc_index))
        found: dict[tuple[int, int, int], _Doc] = {}
        for (source_id, shard), indices in wanted.items():
            if not (0 <= source_id < len(self.plan.sources) and 0 <= shard < len(self.plan.sources[source_id].shards)):
                raise DataError(f"loader state: no shard {shard} in source {source_id}; not this data config")
            src = self.plan.sources[source_id]
            entry = src.shards[shard]
            tags = load_sidecar(src.tags, entry) if src.tags is not None else None
            for raw in read_documents(Path(src.path) / entry["name"], entry, indices):
                made = self._make_doc(source_id, src, raw, tags)
                if made is None:
                    raise DataError(f"loader state: document {raw.doc_index} of {src.name} is not in the "
                                    "training stream of this data config")
                made.shard = shard
                found[(source_id, shard, raw.doc_index)] = made
        return [dataclasses.replace(found[(int(s), int(h), int(d))], start=int(start)) for s, h, d, start in refs]

    def _make_doc(self, source_id: int, src: _SourcePlan, doc: Any, tags: dict | None) -> _Doc | None:
        """None when the document is not in this split (held out / train) or the policy drops it."""
        if is_heldout(doc.key, self.cfg.heldout_fraction) != (self.split == "heldout"):
            return None
        tag = tags.get(doc.doc_index) if tags is not None else None
        if tags is not None and tag is None:
            raise DataError(f"{src.tags}: no tag for document {doc.doc_index} of {src.name}")
        true_role = src.true_label or (tag or {}).get("true")
        if true_role is not None:
            check_role(true_role, self.cfg.domains, f"{src.tags or src.path}: true label of doc {doc.doc_index}")
        if self.cfg.keep_true is not None and true_role not in self.cfg.keep_true:
            return None
        uid = f"{src.name}:{doc.doc_index}"
        code = true_code(true_role, self.cfg.domains) if true_role is not None else TrueLabel.PAD
        if self.split == "heldout":
            return _Doc(doc.tokens, Mode.UNLABELLED, code, source_id, doc.doc_index)
        paragraphs = None
        if self.plan.newlines is not None:
            paragraphs = paragraph_spans(doc.tokens, self.plan.newlines)
        kept = apply_filter(doc.tokens, self.assigner.assign(uid, true_role, tag, paragraphs), self.cfg.filter)
        if kept is None:
            return None
        tokens, token_modes, cuts = kept
        return _Doc(tokens, token_modes, code, source_id, doc.doc_index, cuts=cuts)

    def _mixed_doc(self) -> _Doc:
        """Pick the source per document with p ~ weight / mean doc length (so weights are token shares);
        the filter applies after the pick, so dropping forget docs never over-samples the rest."""
        sources = self.plan.sources
        while self.active:
            ids = self.active
            p = np.array([sources[i].weight / sources[i].mean_doc_tokens for i in ids])
            choice = ids[int(self.mix_rng.choice(len(ids), p=p / p.sum()))]
            try:
                doc = self.cursors[choice].next()
            except StopIteration:
                self.active = [i for i in ids if i != choice]
                continue
            self.picks += 1
            if doc is not None:
                self.kept += 1
                return doc
            if self.picks >= 1_000_000:
                if self.kept == 0:
                    raise DataError("data: the filter policy and split drop every document of every source")
                self.picks = self.kept = 0
        raise StopIteration

    def _shuffled_doc(self) -> _Doc:
        """A shuffle buffer of `shuffle_buffer` documents; when the sources end, the rest in a
        seeded permutation. A buffer over its size (prefilled by a reshard) is drained first."""
        rng, buffer = self.shuffle_rng, self.buffer
        if not self.flushing:
            size = self.cfg.shuffle_buffer
            if len(buffer) > size:
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                return buffer.pop()
            while True:
                try:
                    doc = self._mixed_doc()
                except StopIteration:
                    self.flushing = True
                    order = rng.permutation(len(buffer))
                    buffer[:] = [buffer[i] for i in order[::-1]]  # popped from the end: permutation order
                    break
                if len(buffer) < size:
                    buffer.append(doc)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], doc = doc, buffer[i]
                return doc
        if buffer:
            return buffer.pop()
        raise StopIteration

    def _docs(self) -> Iterator[_Doc]:
        while True:
            try:
                yield self._shuffled_doc()
            except StopIteration:
                return

    def sequences(self, docs: Iterator[_Doc] | None = None) -> Iterator[dict[str, np.ndarray]]:
        return _pack(self._docs() if docs is None else docs, self.seq_len, self.plan.pad_id, self.carry)

    def batches(self, docs: Iterator[_Doc] | None = None) -> Iterator[dict[str, np.ndarray]]:
        rows: list[dict[str, np.ndarray]] = []
        for row in self.sequences(docs):
            rows.append(row)
            if len(rows) == self.batch_size:
                yield _collate(rows)
                rows = []
        if rows:
            yield _collate(rows)


def _slot_rng(seed: int, stream_id: int, slot: int, generation: int) -> np.random.Generator:
    """Per-slot RNGs; a reshard starts a new generation so its slots draw fresh, distinct streams."""
    return _rng(seed, stream_id, slot) if generation == 0 else _rng(seed, stream_id, slot, generation)


def _plain(state: dict) -> dict:
    """A slot state as plain JSON data (worker states arrive with the buffer as an array/tensor)."""
    buffer = state["buffer"]
    if not isinstance(buffer, list):
        buffer = np.asarray(buffer).reshape(-1, 4).tolist()
    return json.loads(json.dumps({**state, "buffer": buffer}))


def initial_slot_state(plan: _Plan, seed: int, slot: int, generation: int = 0) -> dict:
    """The state of a slot before its first batch."""
    cursors = [_SourceCursor.initial(plan, plan.cfg.epochs) for _ in plan.sources]
    return {
        "generation": generation,
        "cursors": cursors,
        "mix": {"rng": _slot_rng(seed, 12, slot, generation).bit_generator.state,
                "active": [i for i, c in enumerate(cursors) if not c["done"]], "picks": 0, "kept": 0},
        "shuffle_rng": _slot_rng(seed, 13, slot, generation).bit_generator.state,
        "flushing": False,
        "buffer": [],
        "carry": [],
        "skipped": [],
        "done": False,
    }


def pack_rows(docs: Iterable[_Doc], seq_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Pack documents into seq_len+1 token rows; a document cut at a row end continues in the next
    row as a new segment that starts with the row's last token again (that token was only a target
    there), so every token but a document's first is predicted exactly once. Only a finite stream
    ends with a padded row."""
    return _pack(iter(docs), seq_len, pad_id, [])


def _pack(docs: Iterator[_Doc], seq_len: int, pad_id: int, carry: list[_Doc]) -> Iterator[dict[str, np.ndarray]]:
    """:func:`pack_rows` with its state in `carry`: at every row end the rest of a cut document
    (from its repeated token on, `start`) is put there, and carried documents are packed first. A
    batch ends at a row end, so a slot's packer state at a batch boundary is just `carry`."""
    rows = seq_len + 1

    def empty() -> dict[str, np.ndarray]:
        return {
            "tokens": np.full(rows, pad_id, np.int64),
            "segment": np.zeros(rows, np.int64),
            "mode": np.full(rows, Mode.UNLABELLED, np.int64),
            "true": np.full(rows, TrueLabel.PAD, np.int64),
            "source": np.full(rows, -1, np.int64),
            "doc": np.full(rows, -1, np.int64),
            "cut": np.zeros(rows, bool),
        }

    row, fill, segment = empty(), 0, 0
    while True:
        if carry:
            doc = carry.pop(0)
        else:
            doc = next(docs, None)
            if doc is None:
                break
        n, offset = len(doc.tokens), doc.start
        while offset < n:
            take = min(n - offset, rows - fill)
            sl = slice(fill, fill + take)
            row["tokens"][sl] = doc.tokens[offset : offset + take]
            row["segment"][sl] = segment
            row["mode"][sl] = doc.modes if isinstance(doc.modes, int) else doc.modes[offset : offset + take]
            row["true"][sl] = doc.true_code
            row["source"][sl] = doc.source_id
            row["doc"][sl] = doc.doc_index
            if doc.cuts is not None:
                row["cut"][sl] = doc.cuts[offset : offset + take]
            fill += take
            offset += take
            segment += 1
            if fill == rows:
                if offset < n:  # continuing: repeat the last token so every next token is a target once
                    carry.insert(0, dataclasses.replace(doc, start=offset - 1))
                yield row
                row, fill, segment = empty(), 0, 0
                break
    if fill:
        row["segment"][fill:] = segment  # padding is its own document
        yield row


def _collate(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of seq_len+1 -> the batch contract (inputs = tokens[:-1], labels = tokens[1:])."""
    tokens = np.stack([r["tokens"] for r in rows])
    segment = np.stack([r["segment"] for r in rows])
    source = np.stack([r["source"] for r in rows])
    labels = tokens[:, 1:].copy()
    cut = np.stack([r["cut"] for r in rows])
    labels[(segment[:, 1:] != segment[:, :-1]) | (source[:, 1:] < 0) | cut[:, 1:]] = IGNORE_INDEX
    modes = np.stack([r["mode"] for r in rows])
    return {
        "input_ids": tokens[:, :-1],
        "labels": labels,
        "modes": modes[:, :-1],
        "target_modes": modes[:, 1:],  # the mode of each label token (exact masking at span edges)
        "doc_ids": segment[:, :-1],
        "true_labels": np.stack([r["true"] for r in rows])[:, :-1],
        "source_ids": source[:, :-1],
        "doc_index": np.stack([r["doc"] for r in rows])[:, :-1],
    }


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- reshard


def _remaining_plans(plan: _Plan, seed: int, source_id: int, cursor: dict, slot: int, n_slots: int,
                     upto: int) -> list[tuple[int, list[list[int]]]]:
    """What a slot has still to read from a source in epochs <= `upto`: (epoch, items) in order."""
    entries = plan.sources[source_id].shards
    items = cursor["items"]
    if items is None:
        items = fresh_items(plan, seed, source_id, cursor["epoch"], slot, n_slots)
    current: list[list[int]] = []
    k = cursor["k"]
    if k < len(items):
        shard, first = items[k]
        start = max(first, cursor["doc"])
        if start < entries[shard]["docs"]:
            current.append([shard, start])
        current += [list(i) for i in items[k + 1 :]]
    out = [(cursor["epoch"], current)] + [(int(e), [list(i) for i in its]) for e, its in cursor["queue"]]
    epochs = plan.cfg.epochs
    for epoch in range(cursor["next_epoch"], upto + 1):
        if epochs is not None and epoch >= epochs:
            break
        out.append((epoch, fresh_items(plan, seed, source_id, epoch, slot, n_slots)))
    return out


def reshard_slots(plan: _Plan, seed: int, old: list[dict], n_new: int) -> list[dict]:
    """The states of `n_new` slots that continue the `len(old)` slots of another layout.

    Per source, the last epoch any slot has begun is E (for a slot, the epoch before its next
    fresh one). Everything the old slots have still to
    read in epochs <= E (the rest of their current shard from the next document on, their other
    shards, plans queued by an earlier reshard, the epochs up to E they had not begun) is dealt
    round-robin to the new slots, epoch by epoch, in the epoch's shard order; epochs after E are
    dealt afresh (`order[slot::n_new]`). Documents taken from the shards but not yet delivered (the
    shuffle buffers, the packers' cut documents) are dealt round-robin too. So within an epoch no
    document is read twice or skipped. The same layout size keeps every slot's own state (a slot's
    stream depends only on its index and the number of slots)."""
    if len(old) == n_new:
        return [json.loads(json.dumps(s)) for s in old]
    generation = max(int(s["generation"]) for s in old) + 1
    new = [initial_slot_state(plan, seed, j, generation) for j in range(n_new)]
    epochs = plan.cfg.epochs
    for source_id in range(len(plan.sources)):
        live = [(j, s["cursors"][source_id]) for j, s in enumerate(old) if not s["cursors"][source_id]["done"]]
        if not live:
            for state in new:
                state["cursors"][source_id]["done"] = True
            continue
        last = max(c["next_epoch"] - 1 for _, c in live)  # the last epoch begun (queues hold none later)
        pending: dict[int, list[list[int]]] = defaultdict(list)
        for j, cursor in live:
            for epoch, items in _remaining_plans(plan, seed, source_id, cursor, j, len(old), last):
                pending[epoch] += items
        queues: list[list[list]] = [[] for _ in range(n_new)]
        for epoch in sorted(pending):
            rank = {int(s): i for i, s in enumerate(_rng(seed, 11, source_id, epoch).permutation(
                len(plan.sources[source_id].shards)))}
            items = sorted(pending[epoch], key=lambda item: (rank[item[0]], item[1]))
            for j in range(n_new):
                mine = items[j::n_new]
                if mine:
                    queues[j].append([epoch, mine])
        for j, queue in enumerate(queues):
            cursor = {"epoch": last + 1, "items": None, "k": 0, "doc": 0, "seen": 0, "queue": [],
                      "next_epoch": last + 2, "done": epochs is not None and last + 1 >= epochs}
            if queue:
                (epoch, items), rest = queue[0], queue[1:]
                cursor.update(epoch=epoch, items=items, queue=rest, next_epoch=last + 1, done=False)
            new[j]["cursors"][source_id] = cursor
    inflight_carry = [ref for s in old for ref in s["carry"]]
    inflight_buffer = [ref for s in old for ref in s["buffer"]]
    skipped = sorted({m for s in old for m in s["skipped"]})
    for j, state in enumerate(new):
        state["carry"] = inflight_carry[j::n_new]
        state["buffer"] = inflight_buffer[j::n_new]
        state["skipped"] = list(skipped)
        state["mix"]["active"] = [i for i, c in enumerate(state["cursors"]) if not c["done"]]
    return new


# ------------------------------------------------------------------------------------- worker dataset


class _WorkerStreams(IterableDataset):
    """One DataLoader worker = one logical worker; physical worker p plays logical (first + p) % W.

    Each batch carries its slot's state after it (`_state`), so the main process always holds the
    state that matches what it delivered, however far the worker has read ahead. In the training
    process (no workers) it carries the stream itself, paused right after that batch: the state is
    taken only when a checkpoint asks for it."""

    def __init__(
        self,
        plan: _Plan,
        dp_rank: int,
        dp_world_size: int,
        n_workers: int,
        seed: int,
        seq_len: int,
        batch_size: int,
        states: list[dict],
        first: int,
    ) -> None:
        self.plan, self.dp_rank, self.dp_world_size, self.n_workers = plan, dp_rank, dp_world_size, n_workers
        self.seed, self.seq_len, self.batch_size = seed, seq_len, batch_size
        self.states, self.first = states, first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (self.first + physical) % self.n_workers
        state = self.states[worker]
        if state["done"]:
            return
        slot = self.dp_rank * self.n_workers + worker
        try:
            stream = _SlotStream(self.plan, slot, self.dp_world_size * self.n_workers, self.seed, self.seq_len,
                                 self.batch_size, state=state)
            for batch in stream.batches():
                out: dict[str, Any] = _to_torch(batch)
                out["_worker"], out["_state"] = worker, stream if info is None else stream.snapshot()
                yield out
        except DataError as exc:  # one line in the main process, not a worker traceback
            yield {"_worker": worker, "_error": str(exc)}
            return
        yield {"_worker": worker, "_end": True, "_state": {**stream.snapshot(), "done": True}}


class StreamingLoader:
    """Iterator of batch dicts for one data-parallel rank; `state_dict()` makes it resume exactly.

    TP ranks of one DP group build it with the same dp_rank and get identical batches. The state
    holds positions, not counts (see the module docstring): `load_state_dict` costs the same at
    batch 10 as at batch 10 million, and `load_global_state` continues on another layout.
    """

    def __init__(
        self, plan: _Plan, *, dp_rank: int, dp_world_size: int, seed: int, micro_batch_size: int, seq_len: int
    ) -> None:
        if not 0 <= dp_rank < dp_world_size:
            raise DataError(f"dp_rank: expected 0 <= dp_rank < dp_world_size={dp_world_size}, got {dp_rank}")
        if micro_batch_size < 1 or seq_len < 1:
            raise DataError(f"micro_batch_size/seq_len: expected positive integers, got {micro_batch_size}/{seq_len}")
        self.plan, self.dp_rank, self.dp_world_size, self.seed = plan, dp_rank, dp_world_size, seed
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.num_workers = plan.cfg.num_workers
        self.n_logical = max(1, self.num_workers)
        n_slots = dp_world_size * self.n_logical
        for i, src in enumerate(plan.sources):
            if len(src.shards) < n_slots:
                raise DataError(
                    f"data.sources[{i}] ({src.path}): {len(src.shards)} shards cannot feed "
                    f"{n_slots} streams (dp_world_size x workers); re-shard with a smaller "
                    "--shard-size-mb"
                )
        self.source_names = [s.name for s in plan.sources]
        self.slots: list[dict | _SlotStream] = [initial_slot_state(plan, seed, self._slot(w))
                                                 for w in range(self.n_logical)]
        self.delivered = [0] * self.n_logical
        self.next_worker = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None

    def _slot(self, worker: int) -> int:
        return self.dp_rank * self.n_logical + worker

    def _states(self) -> list[dict]:
        """Every logical worker's slot state, as plain JSON-able data."""
        return [_plain(s.snapshot() if isinstance(s, _SlotStream) else s) for s in self.slots]

    @property
    def done(self) -> list[bool]:
        return [not isinstance(s, _SlotStream) and bool(s["done"]) for s in self.slots]

    @property
    def skipped_shards(self) -> list[str]:
        return sorted({m for s in self.slots for m in (s.skipped if isinstance(s, _SlotStream) else s["skipped"])})

    @property
    def epochs(self) -> list[list[int]]:
        return [s.epochs if isinstance(s, _SlotStream) else [c["epoch"] for c in s["cursors"]] for s in self.slots]

    def _fingerprint(self) -> str:
        """What decides the global stream; the layout (dp_world_size, num_workers) is not in it."""
        spec = {
            "data": self.plan.cfg.to_dict(),
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            "shards": [[e["sha256"] for e in s.shards] for s in self.plan.sources],
        }
        for key in ("skip_bad_shards", "num_workers"):
            spec["data"].pop(key)
        if spec["data"].get("keep_true") is None:
            spec["data"].pop("keep_true", None)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _start(self) -> Iterator[dict[str, Any]]:
        self.slots = self._states()
        dataset = _WorkerStreams(
            self.plan,
            self.dp_rank,
            self.dp_world_size,
            self.n_logical,
            self.seed,
            self.seq_len,
            self.micro_batch_size,
            self.slots,
            self.next_worker,
        )
        if self.num_workers == 0:
            return iter(dataset)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4)
        return iter(self._loader)

    def __iter__(self) -> StreamingLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if all(self.done):
                raise StopIteration
            if self._iterator is None:
                self._iterator = self._start()
            try:
                item = next(self._iterator)
            except StopIteration:
                self.close()
                raise
            worker = item.pop("_worker")
            if "_error" in item:
                self.close()
                raise DataError(item["_error"])
            self.next_worker = (worker + 1) % self.n_logical
            self.slots[worker] = item.pop("_state")
            if item.pop("_end", False):
                continue
            self.delivered[worker] += 1
            return item

    def close(self) -> None:
        """Stop worker processes (a later next() restarts them from the current state)."""
        self._iterator, self._loader = None, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "batches": sum(self.delivered),
            "delivered": list(self.delivered),
            "done": self.done,
            "next_worker": self.next_worker,
            "epochs": self.epochs,
            "skipped_shards": self.skipped_shards,
            "slots": self._states(),
        }

    def _check(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"loader state: version {found!r}, expected {STATE_VERSION} "
                            "(written by another version of the loader)")
        if state["seed"] != self.seed:
            raise DataError(f"loader state: seed={state['seed']} but this loader has {self.seed}")
        if state["fingerprint"] != self._fingerprint():
            raise DataError(
                "loader state: made with a different data config, shards, seq_len or micro batch "
                "size; resuming would not reproduce the batch sequence"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's own state (same layout): the batch sequence continues bit for bit.
        Refuses a state from a different data config/seed/shape or layout (one line)."""
        self._check(state)
        for key in ("dp_world_size", "num_workers", "dp_rank"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state: {key}={state[key]} but this loader has {getattr(self, key)} "
                                "(a different layout resumes through load_global_state)")
        self.close()
        self.slots = json.loads(json.dumps(state["slots"]))
        self.delivered = list(state["delivered"])
        self.next_worker = int(state["next_worker"])

    def load_global_state(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of every DP rank of the run that wrote them (duplicates, e.g. one
        per TP rank, are fine). The same layout restores this rank's state exactly; another DP size
        or worker count continues the global stream through :func:`reshard_slots`."""
        by_rank: dict[int, dict[str, Any]] = {}
        for state in states:
            self._check(state)
            by_rank.setdefault(int(state["dp_rank"]), state)
        layouts = {(s["dp_world_size"], s["num_workers"]) for s in by_rank.values()}
        if len(layouts) != 1:
            raise DataError(f"loader state: the ranks' states come from different layouts {sorted(layouts)}")
        old_dp, old_workers = layouts.pop()
        if sorted(by_rank) != list(range(old_dp)):
            raise DataError(f"loader state: states for dp ranks {sorted(by_rank)}, expected 0..{old_dp - 1} "
                            "(every rank's state is needed to change the layout)")
        if (old_dp, old_workers) == (self.dp_world_size, self.num_workers):
            self.load_state_dict(by_rank[self.dp_rank])
            return
        old = [slot for r in range(old_dp) for slot in by_rank[r]["slots"]]
        new = reshard_slots(self.plan, self.seed, old, self.dp_world_size * self.n_logical)
        self.close()
        self.slots = new[self.dp_rank * self.n_logical : (self.dp_rank + 1) * self.n_logical]
        self.delivered = [0] * self.n_logical
        self.next_worker = 0


def build_loader(
    cfg: DataConfig | dict,
    *,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    seed: int = 0,
    micro_batch_size: int,
    seq_len: int,
) -> StreamingLoader:
    """The training loader for one data-parallel rank (see StreamingLoader)."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
    return StreamingLoader(
        build_plan(cfg),
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        seed=seed,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
    )



# ----------------------------------------------------------------------------------------------- eval


EVAL_SETS = ("forget", "retain", "adjacent")


def build_eval_batches(
    cfg: DataConfig | dict,
    which: str,
    *,
    seq_len: int,
    batch_size: int,
    domain: str | None = None,
    max_batches: int | None = None,
    split: str = "heldout",
) -> list[dict[str, torch.Tensor]]:
    """Fixed batches of documents whose true label is `which` ('forget' of `domain`, default the first
    domain; 'retain'; 'adjacent'), in shard order, packed like training batches; modes are all
    unlabelled. Held-out documents never reach the training loader (same key-hash split).

    `split="train"` draws from the training split instead, ignoring the filter policy (the logit
    calibration fits its bias on training-distribution text, as the paper does: the small held-out
    split would let a per-vocabulary bias over-fit)."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
    if split not in ("heldout", "train"):
        raise DataError(f"eval set: split must be 'heldout' or 'train', got {split!r}")
    if split == "train":
        cfg = dataclasses.replace(cfg, filter="none")
    if which not in EVAL_SETS:
        raise DataError(f"eval set: expected one of {list(EVAL_SETS)}, got {which!r}")
    domain = domain or cfg.domains[0]
    if domain not in cfg.domains:
        raise DataError(f"eval set: domain {domain!r} is not in data.domains {cfg.domains}")
    wanted = true_code(f"forget:{domain}" if which == "forget" else which, cfg.domains)
    plan = build_plan(cfg)
    stream = _SlotStream(plan, 0, 1, 0, seq_len, batch_size, split=split)

    def docs() -> Iterator[_Doc]:
        for source_id, src in enumerate(plan.sources):
            for entry in src.shards:
                tags = load_sidecar(src.tags, entry) if src.tags is not None else None
                try:
                    for doc in iter_shard_documents(Path(src.path) / entry["name"], entry):
                        made = stream._make_doc(source_id, src, doc, tags)
                        if made is not None and made.true_code == wanted:
                            yield made
                except DataError:
                    if not cfg.skip_bad_shards:  # as in training: skip (the same shards every run)
                        raise

    batches = []
    for batch in stream.batches(docs()):
        batch = _to_torch(batch)
        batch["modes"] = torch.zeros_like(batch["modes"])  # unlabelled for either split
        batch["target_modes"] = torch.zeros_like(batch["target_modes"])
        batches.append(batch)
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches


def tagging_report(cfg: DataConfig | dict, split: str = "train") -> Confusion:
    """Documents and tokens per (true label, applied mode) over a split, before the filter policy."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
    plan = build_plan(cfg)
    assigner = ModeAssigner(cfg.tagging, cfg.domains, plan.false_positive_rate)
    confusion = Confusion()
    for src in plan.sources:
        for entry in src.shards:
            tags = load_sidecar(src.tags, entry) if src.tags is not None else None
            for doc in iter_shard_documents(Path(src.path) / entry["name"], entry):
                if is_heldout(doc.key, cfg.heldout_fraction) != (split == "heldout"):
                    continue
                tag = tags.get(doc.doc_index) if tags else None
                true_role = src.true_label or (tag or {}).get("true")
                modes = assigner.assign(f"{src.name}:{doc.doc_index}", true_role, tag)
                confusion.add(true_role, mode_name(modes.mode, cfg.domains), len(doc.tokens))
    return confusion
