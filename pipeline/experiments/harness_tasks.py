"""lm-evaluation-harness task files made from a run's **held-out** documents, for `sgtm eval-harness`.

Why generated, not downloaded: the models here are trained on the project's own corpora (bilingual
TinyStories, Wikipedia leads) with their own tokenizers, and the evaluation runs offline. Every item
comes from a document on the held-out side of the run's train/held-out split
(:func:`pipeline.data.labels.is_heldout` with the run's ``data.heldout_fraction``), grouped by the
document's true role (``retain``, ``forget:<domain>``, ``adjacent``), so each task measures one domain.

Two kinds of four-way multiple-choice task per role (``output_type: multiple_choice``, scored by
the harness with ``acc`` and ``acc_norm``; chance is 1/4):

* ``cloze``: a held-out passage up to a word (at most :data:`CONTEXT_WORDS` words of context) and
  the true next word among three distractor words, each an occurrence drawn at random from the same
  role's held-out text (so a model that only knows word frequencies sits near chance; one that uses
  the context does better).
* ``continuation``: the opening of a held-out document (a Wikipedia lead, a story) and its true next
  :data:`SPAN_WORDS` words among three spans of the same length from other held-out documents of the
  same role.

Generation is a pure function of (held-out documents, kind, seed, max items): the same inputs give
byte-identical files. The task YAMLs use the harness's ``json`` loader on local JSONL files
(``dataset_kwargs: {data_files: {test: FILE}}``), so ``HF_DATASETS_OFFLINE=1`` suffices.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("cloze", "continuation")
CHOICES = 4
CONTEXT_WORDS = 48  # the longest cloze context: ~70 tokens, inside the models' 128-token window
MIN_CONTEXT_WORDS = 8
SPAN_WORDS = 8
MAX_PREFIX_WORDS = 40
FORMAT = "sgtm-harness-tasks/1"
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters (accented ones too)
_TOKEN = re.compile(r"\S+")


class TaskError(ValueError):
    """Bad input to the task generator: one line naming what and what was expected."""


@dataclass(frozen=True)
class Document:
    key: str
    role: str  # retain | forget:<domain> | adjacent
    text: str
    source: str


def task_name(kind: str, role: str) -> str:
    """``sgtm_<kind>_<role>`` with the role made a task-name word (forget:spanish -> forget_spanish)."""
    return f"sgtm_{kind}_{re.sub(r'[^0-9a-zA-Z]+', '_', role).strip('_')}"


def read_documents(data_cfg, split: str = "heldout") -> list[Document]:
    """Every document of the run's sources on one side of the split (``heldout`` or ``train``),
    decoded to text, with its true role (the source's ``true_label`` or its tag's ``true``)."""
    from pipeline.data.labels import is_heldout
    from pipeline.data.loader import build_plan
    from pipeline.data.shards import iter_shard_documents
    from pipeline.data.tagging import load_sidecar
    from pipeline.data.tokenizer import load_tokenizer

    if split not in ("heldout", "train"):
        raise TaskError(f"split: expected 'heldout' or 'train', got {split!r}")
    if not data_cfg.heldout_fraction > 0:
        raise TaskError(f"data.heldout_fraction: {data_cfg.heldout_fraction} leaves no held-out documents "
                        "to make tasks from (expected > 0)")
    plan = build_plan(data_cfg)  # checks manifests, tokenizer hashes and tags (one-line errors)
    tok = load_tokenizer(data_cfg.tokenizer)
    out: list[Document] = []
    for src in plan.sources:
        for entry in src.shards:
            tags = load_sidecar(src.tags, entry) if src.tags is not None else None
            for doc in iter_shard_documents(Path(src.path) / entry["name"], entry):
                if is_heldout(doc.key, data_cfg.heldout_fraction) != (split == "heldout"):
                    continue
                role = src.true_label or (tags or {}).get(doc.doc_index, {}).get("true")
                if role is None:
                    raise TaskError(f"{src.tags or src.path}: document {doc.doc_index} has no true role "
                                    "(expected the source's true_label or a tag with 'true')")
                ids = doc.tokens[:-1] if len(doc.tokens) and doc.tokens[-1] == tok.eot_id else doc.tokens
                out.append(Document(doc.key, role, tok.decode(ids.tolist()).strip(), src.name))
    return out


def _rng(seed: int, kind: str, role: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{kind}|{role}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _context_start(prefix: str, words: int) -> int:
    """Character offset where the last ``words`` whitespace-separated words of ``prefix`` begin."""
    starts = [m.start() for m in _TOKEN.finditer(prefix)]
    return starts[-words] if len(starts) > words else 0


def _shuffled(rng: np.random.Generator, truth: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [truth, *distractors]
    order = rng.permutation(len(choices))
    return [choices[i] for i in order], int(np.flatnonzero(order == 0)[0])


def cloze_items(docs: list[Document], role: str, n: int, seed: int) -> list[dict]:
    """Up to ``n`` next-word items from ``docs`` (all of role ``role``): see the module docstring."""
    rng = _rng(seed, "cloze", role)
    words = [(i, m) for i, d in enumerate(docs) for m in _WORD.finditer(d.text)]
    pool = [m.group() for _, m in words]
    candidates = [(i, m) for i, m in words
                  if len(_TOKEN.findall(docs[i].text[:m.start()])) >= MIN_CONTEXT_WORDS
                  and docs[i].text[m.start() - 1:m.start()].isspace()  # a whole word after a space,
                  and docs[i].text[m.end():m.end() + 1] not in ("'", "\u2019", "-")]  # not "don" of "don't"
    if len(set(w.lower() for w in pool)) < CHOICES:
        return []
    items = []
    for ci in rng.permutation(len(candidates))[:n]:
        i, m = candidates[int(ci)]
        doc, target = docs[i], m.group()
        prefix = doc.text[:m.start()].rstrip()
        context = prefix[_context_start(prefix, CONTEXT_WORDS):]
        seen, distractors = {target.lower()}, []
        while len(distractors) < CHOICES - 1:
            w = pool[int(rng.integers(len(pool)))]
            if w.lower() not in seen:
                seen.add(w.lower())
                distractors.append(w)
        choices, gold = _shuffled(rng, target, distractors)
        items.append({"id": f"{doc.key}@{m.start()}", "doc": doc.key, "source": doc.source, "role": role,
                      "context": context, "choices": choices, "gold": gold})
    return items


def _span(text: str, starts: list[int], ends: list[int], k: int) -> str:
    return text[starts[k]:ends[k + SPAN_WORDS - 1]]


def continuation_items(docs: list[Document], role: str, n: int, seed: int) -> list[dict]:
    """Up to ``n`` items: a document's opening and its true next words among other documents' spans."""
    rng = _rng(seed, "continuation", role)
    spans = []
    for d in docs:
        ms = list(_TOKEN.finditer(d.text))
        spans.append(([m.start() for m in ms], [m.end() for m in ms]))
    usable = [i for i, (s, _) in enumerate(spans) if len(s) >= MIN_CONTEXT_WORDS + SPAN_WORDS]
    if len(usable) < CHOICES:
        return []
    items = []
    for ui in rng.permutation(len(usable))[:n]:
        i = usable[int(ui)]
        starts, ends = spans[i]
        cut = int(rng.integers(MIN_CONTEXT_WORDS, min(MAX_PREFIX_WORDS, len(starts) - SPAN_WORDS) + 1))
        truth = _span(docs[i].text, starts, ends, cut)
        others = [j for j in usable if j != i]
        distractors: list[str] = []
        for j in rng.permutation(len(others)):
            s, e = spans[others[int(j)]]
            k = int(rng.integers(0, len(s) - SPAN_WORDS + 1))
            span = _span(docs[others[int(j)]].text, s, e, k)
            if span != truth and span not in distractors:
                distractors.append(span)
            if len(distractors) == CHOICES - 1:
                break
        if len(distractors) < CHOICES - 1:
            continue
        choices, gold = _shuffled(rng, truth, distractors)
        items.append({"id": f"{docs[i].key}@{starts[cut]}", "doc": docs[i].key, "source": docs[i].source,
                      "role": role, "context": docs[i].text[:ends[cut - 1]], "choices": choices, "gold": gold})
    return items


GENERATORS = {"cloze": cloze_items, "continuation": continuation_items}


def task_yaml(name: str, data_file: Path) -> str:
    """The harness's task config: local JSONL through the ``json`` loader, 4-way multiple choice."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        "target_delimiter: ' '",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def parse_kinds(kinds: list[str] | None) -> list[str]:
    kinds = list(kinds or KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise TaskError(f"--tasks: unknown task kind {bad[0]!r} (expected some of {', '.join(KINDS)})")
    return kinds


def write_tasks(docs: list[Document], out: str | Path, kinds: list[str] | None = None, seed: int = 0,
                max_items: int = 500) -> dict:
    """Write ``<name>.jsonl`` + ``<name>.yaml`` per (kind, role) and ``tasks.json`` (what was made,
    from how many held-out documents) into ``out``; returns the ``tasks.json`` record."""
    kinds = parse_kinds(kinds)
    if max_items < 1:
        raise TaskError(f"--max-items: expected a positive number of items per task, got {max_items}")
    if not docs:
        raise TaskError("held-out split: no documents to make tasks from (expected at least one held-out document)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roles = sorted({d.role for d in docs})
    tasks = {}
    for kind in kinds:
        for role in roles:
            mine = [d for d in docs if d.role == role]
            items = GENERATORS[kind](mine, role, max_items, seed)
            if not items:
                continue
            name = task_name(kind, role)
            data = out / f"{name}.jsonl"
            data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
            (out / f"{name}.yaml").write_text(task_yaml(name, data))
            tasks[name] = {"kind": kind, "role": role, "items": len(items), "heldout_docs": len(mine),
                           "choices": CHOICES, "chance": 1 / CHOICES, "file": data.name}
    if not tasks:
        raise TaskError(f"held-out split: {len(docs)} documents are too short to make any {'/'.join(kinds)} item")
    record = {"format": FORMAT, "seed": seed, "max_items": max_items, "kinds": kinds, "tasks": tasks}
    (out / "tasks.json").write_text(json.dumps(record, indent=2))
    return record


def read_items(path: str | Path) -> list[dict]:
    """The items of one task file, checked (one-line errors naming the file, line and field)."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            it = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        for field, typ in (("context", str), ("choices", list), ("gold", int), ("doc", str), ("role", str)):
            if not isinstance(it.get(field), typ):
                raise TaskError(f"{path}:{n}: field {field!r} missing or not a {typ.__name__}")
        if len(it["choices"]) != CHOICES or not 0 <= it["gold"] < CHOICES:
            raise TaskError(f"{path}:{n}: expected {CHOICES} choices and 0 <= gold < {CHOICES}")
        items.append(it)
    return items
