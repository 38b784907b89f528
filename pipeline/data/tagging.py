"""Tagging: classifier predictions as per-document sidecars, and the policy that turns them into modes.

`tag_shards` writes, for every shard `X.tar`, a sidecar `X.tar.tags.jsonl` (first line: a header
with the shard's sha256, so tags can never be applied to a different shard; then one record per
document: true role, predicted label, confidence, class probabilities, paragraph spans), plus a
`tags.json` summary. `ModeAssigner` is the single place where tags, thresholds, the retain fraction
and the label-noise simulator decide a document's mode; the loader and the reports both use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.codes import Mode, mode_name
from pipeline.data.classifier import Classifier, load_classifier
from pipeline.data.config import TaggingConfig
from pipeline.data.distributed_prep import Split, check_same, collect_ranks, shard_range
from pipeline.data.errors import DataError
from pipeline.data.io import atomic_write_bytes, atomic_write_json
from pipeline.data.labels import LabelRules, unit_hash
from pipeline.data.shards import iter_shard_documents, load_manifest
from pipeline.data.tokenizer import TextTokenizer

TAGS_FORMAT = "sgtm-tags/1"
RANK_FORMAT = "sgtm-tags-rank/1"
SUMMARY = "tags.json"
RANKS = "_ranks"  # a split run's per-rank markers (deleted by the merge)


def sidecar_path(tags_dir: str | os.PathLike, shard_name: str) -> Path:
    return Path(tags_dir) / f"{shard_name}.tags.jsonl"


# ----------------------------------------------------------------------------------------- mode policy


@dataclass
class DocModes:
    mode: int  # document-level applied mode (what the filter looks at when there are no spans)
    adjacent: bool  # counted as adjacent by the strict filter
    # Paragraph granularity: (start, end, mode, adjacent) per paragraph, covering the document; they
    # override `mode` token by token, and the filters drop exactly the spans they tag (loader).
    spans: list[tuple[int, int, int, bool]] | None = None


class ModeAssigner:
    """Tags + thresholds (+ simulated noise) -> a mode per document or paragraph; every draw is keyed
    by the document (a paragraph's noise draws by the document and the paragraph's index)."""

    def __init__(
        self, cfg: TaggingConfig, domains: list[str], false_positive_rate: float | None = None
    ) -> None:
        self.cfg, self.domains = cfg, domains
        self.fpr = cfg.false_positive_rate if false_positive_rate is None else false_positive_rate

    def _retain_or_unlabelled(self, uid: str) -> int:
        return Mode.RETAIN if unit_hash(self.cfg.seed, "retain", uid) < self.cfg.retain_fraction else Mode.UNLABELLED

    def assign(
        self, uid: str, true_role: str | None, tag: dict | None, paragraphs: list[tuple[int, int]] | None = None
    ) -> DocModes:
        """`paragraphs`: the document's paragraph token ranges (`paragraph_spans`), which the
        simulated source needs at paragraph granularity (the classifier's spans are in its tag)."""
        cfg = self.cfg
        if cfg.source == "simulated":
            if true_role is None:
                raise DataError(f"document {uid}: no true label for the noise simulator")
            doc = DocModes(*self._simulated(uid, true_role, uid))
            if cfg.granularity == "paragraph" and paragraphs is not None and len(paragraphs) > 1:
                # Each paragraph draws its own noise at the document rates (undiscovered, false
                # positive); the retain/unlabelled choice stays the document's, as for classifier spans.
                doc.spans = [(s, e, *self._simulated(f"{uid}#{j}", true_role, uid))
                             for j, (s, e) in enumerate(paragraphs)]
            return doc
        assert tag is not None
        mode = self._mode_from_probs(uid, tag["probs"])
        adjacent = tag["probs"].get("adjacent", 0.0) >= cfg.adjacent_threshold
        spans = None
        if cfg.granularity == "paragraph" and tag.get("spans"):
            spans = [(s, e, self._mode_from_probs(uid, {label: conf}),
                      label == "adjacent" and conf >= cfg.adjacent_threshold) for s, e, label, conf in tag["spans"]]
        return DocModes(mode, adjacent, spans)

    def _simulated(self, unit: str, true_role: str, uid: str) -> tuple[int, bool]:
        """(mode, adjacent) of one document or paragraph (`unit` keys its noise draws, `uid` its
        retain draw): the paper's controlled noise on top of the true label."""
        cfg = self.cfg
        if true_role.startswith("forget:"):
            if unit_hash(cfg.seed, "undiscovered", unit) < cfg.undiscovered_rate:
                return Mode.UNLABELLED, False
            return Mode.FORGET + self.domains.index(true_role[7:]), False
        adjacent = true_role == "adjacent"
        if unit_hash(cfg.seed, "false_positive", unit) < self.fpr:
            return Mode.FORGET + int(unit_hash(cfg.seed, "fp_domain", unit) * len(self.domains)), adjacent
        return self._retain_or_unlabelled(uid), adjacent

    def _mode_from_probs(self, uid: str, probs: dict[str, float]) -> int:
        best_domain, best_p = None, -1.0
        for d, name in enumerate(self.domains):
            p = probs.get(f"forget:{name}", 0.0)
            if p > best_p:
                best_domain, best_p = d, p
        if best_p >= self.cfg.forget_threshold and best_p > 0:
            return Mode.FORGET + best_domain
        if probs.get("retain", 0.0) >= self.cfg.retain_threshold:
            return self._retain_or_unlabelled(uid)
        return Mode.UNLABELLED


def false_positive_rate_for_precision(precision: float, recall: float, n_forget: int, n_other: int) -> float:
    """precision = recall*F / (recall*F + fpr*N)  =>  fpr = recall*F*(1-precision) / (precision*N)."""
    if n_other == 0:
        return 0.0
    return min(1.0, recall * n_forget * (1 - precision) / (precision * n_other))


class Confusion:
    """Documents and tokens per (true label, applied mode): what tagging actually did."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

    def add(self, true_role: str | None, mode: str, n_tokens: int) -> None:
        cell = self.table[(true_role or "unknown", mode)]
        cell[0] += 1
        cell[1] += n_tokens

    def rows(self) -> list[list]:
        """[true label, mode, docs, tokens] per cell: a rank's part of the table."""
        return [[t, m, d, n] for (t, m), (d, n) in sorted(self.table.items())]

    def add_rows(self, rows: list[list]) -> None:
        for true_role, mode, docs, tokens in rows:
            cell = self.table[(true_role, mode)]
            cell[0] += docs
            cell[1] += tokens

    def to_dict(self) -> dict:
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (true_role, mode), (docs, tokens) in sorted(self.table.items()):
            out.setdefault(true_role, {})[mode] = {"docs": docs, "tokens": tokens}
        return out

    def format(self) -> str:
        modes = sorted({m for _, m in self.table})
        rows = sorted({t for t, _ in self.table})
        width = max([len(m) for m in modes] + [16])
        lines = [
            "docs / tokens by true label (rows) x applied mode (columns)",
            f"{'true label':<16} " + " ".join(f"{m:>{width}}" for m in modes),
        ]
        for r in rows:
            cells = [self.table.get((r, m), [0, 0]) for m in modes]
            lines.append(f"{r:<16} " + " ".join(f"{f'{c[0]}/{c[1]}':>{width}}" for c in cells))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sidecars


def load_sidecar(tags_dir: str | os.PathLike, shard_entry: dict) -> dict[int, dict]:
    """doc_index -> tag record for one shard, refusing tags made for a different shard."""
    path = sidecar_path(tags_dir, shard_entry["name"])
    if not path.exists():
        raise DataError(f"{path}: missing tags for shard {shard_entry['name']} (run `sgtm data tag`)")
    try:
        with open(path, encoding="utf-8") as handle:
            header = json.loads(handle.readline())
            records = [json.loads(line) for line in handle]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt tags file ({exc})") from None
    if header.get("format") != TAGS_FORMAT or header.get("sha256") != shard_entry["sha256"]:
        raise DataError(
            f"{path}: tags do not match their shard {shard_entry['name']} "
            f"(made for sha256 {str(header.get('sha256'))[:12]}, shard is {shard_entry['sha256'][:12]})"
        )
    if len(records) != shard_entry["docs"]:
        raise DataError(
            f"{path}: {len(records)} tag records for {shard_entry['docs']} documents in the shard"
        )
    return {r["doc"]: r for r in records}


def newline_tables(tokenizer: TextTokenizer) -> np.ndarray:
    """[vocab, 3] booleans: token text contains a blank line / ends with newline / starts with newline."""
    strings = tokenizer.token_strings()
    return np.array([("\n\n" in s, s.endswith("\n"), s.startswith("\n")) for s in strings])


def paragraph_spans(tokens: np.ndarray, newlines: np.ndarray) -> list[tuple[int, int]]:
    """Token ranges split after each blank line (one token holding it, or a newline token followed by
    one starting with a newline: GPT-2's regex splits "\n\nWord" as "\n", "\n", "Word")."""
    body = tokens[:-1]  # never split off the final eot alone
    within = np.flatnonzero(newlines[body, 0]) + 1
    across = np.flatnonzero(newlines[body[:-1], 1] & newlines[body[1:], 2]) + 2
    ends = np.union1d(within, across)
    bounds = [0, *ends[ends < len(tokens)].tolist(), len(tokens)]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]


def tag_shards(
    shards_dir: str,
    classifier_spec: str,
    out: str,
    tokenizer: TextTokenizer,
    rules: LabelRules | None = None,
    assigner: ModeAssigner | None = None,
    progress: bool = True,
    classifier: Classifier | None = None,
    split: Split | None = None,
) -> dict:
    """Tag every document (and paragraph) of a shard directory; restartable shard by shard.

    `classifier_spec`: a .npz from `train-classifier`, a fastText .bin/.ftz, a local Hugging Face
    directory (`classifier`: that spec already loaded, e.g. with a label map), or 'truth' (the label
    rules' answer with confidence 1, for controlled experiments). True roles come from `rules`
    (default: the rules the classifier was trained with). `split`: tag only this rank's shard range
    and write its rank marker instead of `tags.json` (then `merge_tags`).
    """
    setup = _TagSetup(shards_dir, classifier_spec, tokenizer, rules, assigner, classifier)
    manifest = setup.manifest
    entries = manifest["shards"]
    if split is not None:
        entries = [entries[i] for i in shard_range(len(entries), split)]
    newlines = newline_tables(tokenizer)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = Confusion()
    from tqdm import tqdm

    desc = "tag" if split is None else f"tag {split.name}"
    for entry in tqdm(entries, desc=desc, unit=" shards", disable=not progress):
        path = sidecar_path(out_dir, entry["name"])
        records = None
        if path.exists():  # restart: keep sidecars already written for this exact shard
            try:
                records = list(load_sidecar(out_dir, entry).values())
            except DataError:
                records = None
        if records is None:
            records = _tag_one_shard(
                Path(shards_dir) / entry["name"], entry, setup.classifier, setup.classes, setup.rules,
                tokenizer, newlines,
            )
            header = {
                "format": TAGS_FORMAT,
                "shard": entry["name"],
                "sha256": entry["sha256"],
                "docs": entry["docs"],
                "classifier": str(classifier_spec),
                "classes": setup.classes,
            }
            lines = [json.dumps(header)] + [json.dumps(r, separators=(",", ":")) for r in records]
            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        for r in records:
            modes = setup.assigner.assign(f"{manifest['source']}:{r['doc']}", r["true"], r)
            confusion.add(r["true"], mode_name(modes.mode, setup.domains), r["n_tokens"])
    if split is not None:  # the rank's marker, last: its sidecars are all in place
        marker = {"format": RANK_FORMAT, "rank": split.rank, "world": split.world, "identity": setup.identity(),
                  "shards": [e["name"] for e in entries], "confusion": confusion.rows()}
        atomic_write_json(out_dir / RANKS / f"{split.name}.json", marker)
        return {**marker, "confusion_text": confusion.format()}
    return _write_summary(setup, out_dir, confusion)


def merge_tags(
    shards_dir: str,
    classifier_spec: str,
    out: str,
    tokenizer: TextTokenizer,
    rules: LabelRules | None = None,
    assigner: ModeAssigner | None = None,
    classifier: Classifier | None = None,
) -> dict:
    """The merge of a split `sgtm data tag`: check that ranks 0..W-1 all finished with these settings
    and covered every shard once, sum their tables, write `tags.json` (identical to the one-process
    file), and delete the rank markers."""
    setup = _TagSetup(shards_dir, classifier_spec, tokenizer, rules, assigner, classifier)
    out_dir = Path(out)
    root = out_dir / RANKS
    markers = sorted(root.glob("*.json")) if root.is_dir() else []
    ranks = collect_ranks(root, [(m.name, m) for m in markers], "sgtm data tag --rank R --world-size W")
    check_same(ranks, "identity", setup.identity(), root,
               "--shards, --classifier, --labels, thresholds or label map")
    owners: dict[str, int] = {}
    confusion = Confusion()
    for rank, (_, record) in sorted(ranks.items()):
        for name in record["shards"]:
            if name in owners:
                raise DataError(f"{root}: shard {name} tagged by ranks {owners[name]} and {rank}")
            owners[name] = rank
        confusion.add_rows(record["confusion"])
    for entry in setup.manifest["shards"]:
        if entry["name"] not in owners:
            raise DataError(f"{root}: no rank tagged shard {entry['name']}")
        path = sidecar_path(out_dir, entry["name"])
        try:
            with open(path, encoding="utf-8") as handle:
                header = json.loads(handle.readline())
        except (OSError, json.JSONDecodeError):
            header = {}
        if header.get("sha256") != entry["sha256"]:
            raise DataError(f"{path}: missing or made for another shard (rank {owners[entry['name']]} marked it done)")
    summary = _write_summary(setup, out_dir, confusion)
    shutil.rmtree(root)
    return summary


class _TagSetup:
    """What `tag_shards` and `merge_tags` derive from their arguments: manifest, classifier, classes,
    true-label rules, domains and the mode policy (the identity every rank must share)."""

    def __init__(
        self,
        shards_dir: str,
        classifier_spec: str,
        tokenizer: TextTokenizer,
        rules: LabelRules | None,
        assigner: ModeAssigner | None,
        classifier: Classifier | None,
    ) -> None:
        self.shards_dir, self.spec = shards_dir, str(classifier_spec)
        self.manifest = load_manifest(shards_dir)
        if classifier_spec == "truth":
            self.classifier = None
            if rules is None:
                raise DataError("--classifier truth: needs --labels YAML (the ground-truth rules)")
            self.classes = sorted({rules.default, *(label for _, label in rules.rules)})
        else:
            self.classifier = classifier if classifier is not None else load_classifier(classifier_spec)
            self.classes = self.classifier.classes
            if rules is None and self.classifier.rules:
                rules = LabelRules.from_dict(self.classifier.rules, f"{classifier_spec} (embedded label rules)")
        self.rules = rules
        self.domains = rules.domains if rules else sorted({c[7:] for c in self.classes if c.startswith("forget:")})
        self.assigner = assigner or ModeAssigner(TaggingConfig(source="classifier"), self.domains)

    def identity(self) -> dict:
        return {
            "source": self.manifest["source"],
            "shards_dir": str(Path(self.shards_dir).resolve()),
            "shards": {e["name"]: e["sha256"] for e in self.manifest["shards"]},
            "classifier": self.spec,
            "backend": self.classifier.describe() if self.classifier is not None else {"kind": "truth"},
            "classes": self.classes,
            "rules": self.rules.raw if self.rules else None,
            "domains": self.domains,
            "policy": {**dataclasses.asdict(self.assigner.cfg), "domains": self.assigner.domains,
                       "false_positive_rate": self.assigner.fpr},
        }


def _write_summary(setup: _TagSetup, out_dir: Path, confusion: Confusion) -> dict:
    summary = {
        "format": TAGS_FORMAT,
        "source": setup.manifest["source"],
        "shards_dir": str(Path(setup.shards_dir).resolve()),
        "classifier": setup.spec,
        "classes": setup.classes,
        "domains": setup.domains,
        "shards": {e["name"]: e["sha256"] for e in setup.manifest["shards"]},
        "confusion": confusion.to_dict(),
    }
    atomic_write_json(out_dir / SUMMARY, summary)
    summary["confusion_text"] = confusion.format()
    return summary


def _tag_one_shard(
    path: Path,
    entry: dict,
    classifier: Classifier | None,
    classes: list[str],
    rules: LabelRules | None,
    tokenizer: TextTokenizer,
    newlines: np.ndarray,
) -> list[dict]:
    documents = list(iter_shard_documents(path, entry))
    texts, owners = [], []  # one row per document, then one per paragraph of multi-paragraph documents
    paragraphs = []
    for i, doc in enumerate(documents):
        texts.append(tokenizer.decode(doc.tokens[:-1]))
        owners.append((i, None))
        spans = paragraph_spans(doc.tokens, newlines)
        paragraphs.append(spans)
        if len(spans) > 1:
            for s, e in spans:
                texts.append(tokenizer.decode(doc.tokens[s:e]))
                owners.append((i, (s, e)))
    if classifier is None:
        truth = [rules.role(d.meta) for d in documents]
        probs = np.array([[1.0 if c == truth[i] else 0.0 for c in classes] for i, _ in owners])
    else:
        probs = classifier.predict_proba(texts)
    records = [
        {
            "doc": d.doc_index,
            "key": d.key,
            "n_tokens": int(len(d.tokens)),
            "true": rules.role(d.meta) if rules else None,
            "spans": [],
        }
        for d in documents
    ]
    for (i, span), p in zip(owners, probs, strict=True):
        best = int(np.argmax(p))
        if span is None:
            records[i].update(
                label=classes[best],
                confidence=round(float(p[best]), 4),
                probs={c: round(float(x), 4) for c, x in zip(classes, p, strict=True)},
            )
        else:
            records[i]["spans"].append([span[0], span[1], classes[best], round(float(p[best]), 4)])
    return records
