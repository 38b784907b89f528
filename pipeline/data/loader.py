"""Streaming loader: shards -> documents -> tags/filter -> weighted mix -> shuffle -> re-pack -> batches.

Why re-pack: the filter policy drops whole documents and tags are per document, so packing must
come after filtering. Shards keep their packed seq_len+1 samples on disk; the loader re-assembles
documents from them, decides each document's mode (tags + thresholds or the noise simulator),
drops what the policy drops, and packs the survivors into sequences of `seq_len + 1` tokens.

Determinism and exact resume: the stream of one (dp rank, worker) *slot* is a pure function of
(seed, slot, config). Shards are split across slots by a seeded per-epoch permutation; source
choice and the shuffle buffer use RNGs seeded by (seed, rank, worker); per-document draws (noise,
retain sampling, held-out split) hash the document id. So the state is just how many batches each
worker has delivered: a restored loader replays each worker's stream and skips that many batches
(reading, not tokenizing: ~1-2M tokens/s per worker), and the DataLoader's round-robin over
workers is rotated so that the next batch comes from the worker that was next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.labels import check_role, is_heldout, true_code
from pipeline.data.shards import check_tokenizer, iter_shard_documents, load_manifest
from pipeline.data.tagging import (
    SUMMARY,
    Confusion,
    ModeAssigner,
    false_positive_rate_for_precision,
    load_sidecar,
)
from pipeline.data.tokenizer import load_tokenizer
from pipeline.sgtm.codes import Mode, TrueLabel, mode_name

STATE_VERSION = 1
IGNORE_INDEX = -100


@dataclass
class _Doc:
    tokens: np.ndarray
    modes: np.ndarray | int  # per-token modes (paragraph spans) or one mode for the document
    true_code: int
    source_id: int
    doc_index: int


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
    return _Plan(cfg, sources, tokenizer.eot_id, fpr)


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


class _SlotStream:
    """The deterministic batch stream of one (dp rank, worker) slot."""

    def __init__(
        self,
        plan: _Plan,
        slot: int,
        n_slots: int,
        seed: int,
        seq_len: int,
        batch_size: int,
        split: str = "train",
    ) -> None:
        self.plan, self.slot, self.n_slots, self.seed = plan, slot, n_slots, seed
        self.seq_len, self.batch_size, self.split = seq_len, batch_size, split
        self.cfg = plan.cfg
        self.assigner = ModeAssigner(self.cfg.tagging, self.cfg.domains, plan.false_positive_rate)
        self.skipped: list[str] = []
        self.epochs = [0] * len(plan.sources)

    # documents of one source, epoch after epoch
    def _source_docs(self, source_id: int) -> Iterator[_Doc | None]:
        src = self.plan.sources[source_id]
        cfg = self.cfg
        epoch = 0
        while cfg.epochs is None or epoch < cfg.epochs:
            self.epochs[source_id] = epoch
            order = _rng(self.seed, 11, source_id, epoch).permutation(len(src.shards))
            mine = [src.shards[i] for i in order[self.slot :: self.n_slots]]
            seen = 0
            for entry in mine:
                shard_path = str(Path(src.path) / entry["name"])
                try:
                    tags = load_sidecar(src.tags, entry) if src.tags is not None else None
                    for doc in iter_shard_documents(shard_path, entry):
                        seen += 1
                        yield self._make_doc(source_id, src, doc, tags)
                except DataError as exc:
                    if not cfg.skip_bad_shards:
                        raise
                    self.skipped.append(str(exc))
            epoch += 1
            if seen == 0:
                return  # this slot has nothing readable from this source: stop instead of spinning

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
        if self.split == "heldout":
            modes = None
        else:
            modes = self.assigner.assign(uid, true_role, tag)
            policy = self.cfg.filter
            if policy != "none" and modes.mode >= Mode.FORGET:
                return None
            if policy == "strict" and modes.adjacent:
                return None
        code = true_code(true_role, self.cfg.domains) if true_role is not None else TrueLabel.PAD
        if modes is None:
            token_modes: np.ndarray | int = Mode.UNLABELLED
        elif modes.spans:
            token_modes = np.full(len(doc.tokens), modes.mode, dtype=np.int64)
            for start, end, mode in modes.spans:
                token_modes[start:end] = mode
        else:
            token_modes = modes.mode
        return _Doc(doc.tokens, token_modes, code, source_id, doc.doc_index)

    def _mixed_docs(self) -> Iterator[_Doc]:
        """Pick the source per document with p ~ weight / mean doc length (so weights are token shares);
        the filter applies after the pick, so dropping forget docs never over-samples the rest."""
        sources = self.plan.sources
        streams = {i: self._source_docs(i) for i in range(len(sources))}
        rng = _rng(self.seed, 12, self.slot)
        kept_since_check, picks_since_check = 0, 0
        while streams:
            ids = sorted(streams)
            p = np.array([sources[i].weight / sources[i].mean_doc_tokens for i in ids])
            choice = ids[int(rng.choice(len(ids), p=p / p.sum()))]
            try:
                doc = next(streams[choice])
            except StopIteration:
                del streams[choice]
                continue
            picks_since_check += 1
            if doc is not None:
                kept_since_check += 1
                yield doc
            if picks_since_check >= 1_000_000:
                if kept_since_check == 0:
                    raise DataError("data: the filter policy and split drop every document of every source")
                kept_since_check = picks_since_check = 0

    def _shuffled_docs(self) -> Iterator[_Doc]:
        rng = _rng(self.seed, 13, self.slot)
        size = self.cfg.shuffle_buffer
        buffer: list[_Doc] = []
        for doc in self._mixed_docs():
            if len(buffer) < size:
                buffer.append(doc)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], doc = doc, buffer[i]
            yield doc
        order = rng.permutation(len(buffer))
        for i in order:
            yield buffer[i]

    def sequences(self, docs: Iterator[_Doc] | None = None) -> Iterator[dict[str, np.ndarray]]:
        return pack_rows(self._shuffled_docs() if docs is None else docs, self.seq_len, self.plan.pad_id)

    def batches(self, docs: Iterator[_Doc] | None = None) -> Iterator[dict[str, np.ndarray]]:
        rows: list[dict[str, np.ndarray]] = []
        for row in self.sequences(docs):
            rows.append(row)
            if len(rows) == self.batch_size:
                yield _collate(rows)
                rows = []
        if rows:
            yield _collate(rows)


def pack_rows(docs: Iterable[_Doc], seq_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Pack documents into seq_len+1 token rows; a document cut at a row end continues in the next
    row as a new segment that starts with the row's last token again (that token was only a target
    there), so every token but a document's first is predicted exactly once. Only a finite stream
    ends with a padded row."""
    rows = seq_len + 1

    def empty() -> dict[str, np.ndarray]:
        return {
            "tokens": np.full(rows, pad_id, np.int64),
            "segment": np.zeros(rows, np.int64),
            "mode": np.full(rows, Mode.UNLABELLED, np.int64),
            "true": np.full(rows, TrueLabel.PAD, np.int64),
            "source": np.full(rows, -1, np.int64),
            "doc": np.full(rows, -1, np.int64),
        }

    row, fill, segment = empty(), 0, 0
    for doc in docs:
        n, offset = len(doc.tokens), 0
        while offset < n:
            take = min(n - offset, rows - fill)
            sl = slice(fill, fill + take)
            row["tokens"][sl] = doc.tokens[offset : offset + take]
            row["segment"][sl] = segment
            row["mode"][sl] = doc.modes if isinstance(doc.modes, int) else doc.modes[offset : offset + take]
            row["true"][sl] = doc.true_code
            row["source"][sl] = doc.source_id
            row["doc"][sl] = doc.doc_index
            fill += take
            offset += take
            segment += 1
            if fill == rows:
                yield row
                row, fill, segment = empty(), 0, 0
                if offset < n:  # continuing: repeat the last token so every next token is a target once
                    offset -= 1
    if fill:
        row["segment"][fill:] = segment  # padding is its own document
        yield row


def _collate(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of seq_len+1 -> the batch contract (inputs = tokens[:-1], labels = tokens[1:])."""
    tokens = np.stack([r["tokens"] for r in rows])
    segment = np.stack([r["segment"] for r in rows])
    source = np.stack([r["source"] for r in rows])
    labels = tokens[:, 1:].copy()
    labels[(segment[:, 1:] != segment[:, :-1]) | (source[:, 1:] < 0)] = IGNORE_INDEX
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


# ------------------------------------------------------------------------------------- worker dataset


class _WorkerStreams(IterableDataset):
    """One DataLoader worker = one logical worker; physical worker p plays logical (first + p) % W."""

    def __init__(
        self,
        plan: _Plan,
        dp_rank: int,
        dp_world_size: int,
        n_workers: int,
        seed: int,
        seq_len: int,
        batch_size: int,
        delivered: list[int],
        done: list[bool],
        first: int,
    ) -> None:
        self.plan, self.dp_rank, self.dp_world_size, self.n_workers = plan, dp_rank, dp_world_size, n_workers
        self.seed, self.seq_len, self.batch_size = seed, seq_len, batch_size
        self.delivered, self.done, self.first = list(delivered), list(done), first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (self.first + physical) % self.n_workers
        if self.done[worker]:
            return
        slot = self.dp_rank * self.n_workers + worker
        stream = _SlotStream(
            self.plan, slot, self.dp_world_size * self.n_workers, self.seed, self.seq_len, self.batch_size
        )
        skip = self.delivered[worker]
        try:
            for index, batch in enumerate(stream.batches()):
                if index < skip:
                    continue
                out: dict[str, Any] = _to_torch(batch)
                out["_worker"], out["_skipped"], out["_epochs"] = (
                    worker,
                    list(stream.skipped),
                    list(stream.epochs),
                )
                yield out
        except DataError as exc:  # one line in the main process, not a worker traceback
            yield {"_worker": worker, "_error": str(exc)}
            return
        yield {
            "_worker": worker,
            "_end": True,
            "_skipped": list(stream.skipped),
            "_epochs": list(stream.epochs),
        }


class StreamingLoader:
    """Iterator of batch dicts for one data-parallel rank; `state_dict()` makes it resume exactly.

    TP ranks of one DP group build it with the same dp_rank and get identical batches.
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
        self.delivered = [0] * self.n_logical
        self.done = [False] * self.n_logical
        self.next_worker = 0
        self.skipped_shards: list[str] = []
        self.epochs = [[0] * len(plan.sources) for _ in range(self.n_logical)]
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None

    def _fingerprint(self) -> str:
        spec = {
            "data": self.plan.cfg.to_dict(),
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            "dp_world_size": self.dp_world_size,
            "shards": [[e["sha256"] for e in s.shards] for s in self.plan.sources],
        }
        spec["data"].pop("skip_bad_shards")
        if spec["data"].get("keep_true") is None:  # fingerprints of configs without it are unchanged
            spec["data"].pop("keep_true", None)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _start(self) -> Iterator[dict[str, Any]]:
        dataset = _WorkerStreams(
            self.plan,
            self.dp_rank,
            self.dp_world_size,
            self.n_logical,
            self.seed,
            self.seq_len,
            self.micro_batch_size,
            self.delivered,
            self.done,
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
            self.skipped_shards = sorted(set(self.skipped_shards) | set(item.pop("_skipped", [])))
            self.epochs[worker] = item.pop("_epochs", self.epochs[worker])
            if item.pop("_end", False):
                self.done[worker] = True
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
            "done": list(self.done),
            "next_worker": self.next_worker,
            "epochs": [list(e) for e in self.epochs],
            "skipped_shards": list(self.skipped_shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; refuses a state from a different data config/seed/shape (resume would not be exact)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state: version {state.get('version')!r}, expected {STATE_VERSION}")
        for key in ("seed", "dp_world_size", "num_workers"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state: {key}={state[key]} but this loader has {getattr(self, key)}")
        if state["fingerprint"] != self._fingerprint():
            raise DataError(
                "loader state: made with a different data config, shards, seq_len or micro batch "
                "size; resuming would not reproduce the batch sequence"
            )
        if state["dp_rank"] != self.dp_rank and any(state["done"]):
            raise DataError(f"loader state: from dp_rank {state['dp_rank']} at an epoch end; load each rank's own")
        self.close()
        self.delivered = list(state["delivered"])
        self.done = list(state["done"])
        self.next_worker = int(state["next_worker"])
        self.epochs = [list(e) for e in state["epochs"]]
        self.skipped_shards = list(state["skipped_shards"])


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
