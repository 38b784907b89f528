"""Upstream domain classifiers: hashed n-grams + logistic regression (words for topics, chars for language),
and as backends for `sgtm data tag`, a fastText model file or a local Hugging Face sequence classifier.

Hashing keeps the model a plain coefficient matrix, so it is saved as .npz + JSON (no pickle) and the
same file tags shards anywhere. Classes are roles ('forget:<d>', 'adjacent', 'retain'), so a
prediction maps to a mode through thresholds alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support

from pipeline.data.errors import DataError, read_yaml
from pipeline.data.labels import LabelRules, is_heldout, unit_hash
from pipeline.data.readers import Document

VECTORIZERS = {
    # topic classification: word unigrams + bigrams
    "words": {"analyzer": "word", "ngram_range": (1, 2), "n_features": 2**18},
    # language identification: character 1-3-grams within word boundaries
    "chars": {"analyzer": "char_wb", "ngram_range": (1, 3), "n_features": 2**16},
}


@dataclass
class HashedTextClassifier:
    kind: str
    classes: list[str]
    coef: np.ndarray  # [classes, features]
    intercept: np.ndarray  # [classes]
    rules: dict | None = None  # the truth rules it was trained with (lets `tag` record true labels)

    def vectorizer(self) -> HashingVectorizer:
        params = VECTORIZERS[self.kind]
        return HashingVectorizer(lowercase=True, alternate_sign=False, norm="l2", **params)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if len(self.classes) == 1:
            return np.ones((len(texts), 1))
        features = self.vectorizer().transform(texts)
        scores = features @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # sklearn's binary form: one row for classes[1]
            p1 = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        scores = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> None:
        header = {
            "format": "sgtm-classifier/1",
            "kind": self.kind,
            "classes": self.classes,
            "rules": self.rules,
        }
        from io import BytesIO

        from pipeline.data.io import atomic_write_bytes

        buffer = BytesIO()
        np.savez_compressed(
            buffer,
            coef=self.coef.astype(np.float32),
            intercept=self.intercept,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
        )
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> HashedTextClassifier:
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                coef, intercept = data["coef"], data["intercept"]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(
                f"{path}: not a classifier written by `sgtm data train-classifier` ({exc})"
            ) from None
        if header.get("format") != "sgtm-classifier/1" or header.get("kind") not in VECTORIZERS:
            raise DataError(f"{path}: unknown classifier format {header.get('format')!r}")
        return cls(header["kind"], header["classes"], coef, intercept, header.get("rules"))

    def describe(self) -> dict:
        return {"kind": f"hashed-{self.kind}", "classes": self.classes}


def train_classifier(
    documents: list[Document],
    rules: LabelRules,
    kind: str,
    *,
    train_fraction: float = 0.3,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 300,
) -> tuple[HashedTextClassifier, dict]:
    """Train on a small labelled seed set (a hashed `train_fraction` of the training split) and report
    precision/recall/F1 per class on the held-out split (the same split the loader holds out)."""
    if kind not in VECTORIZERS:
        raise DataError(f"--kind: expected one of {sorted(VECTORIZERS)}, got {kind!r}")
    labelled = [(d, rules.role(d.meta)) for d in documents]
    train = [
        (d, r)
        for d, r in labelled
        if not is_heldout(d.key, heldout_fraction)
        and unit_hash("seed", seed, d.key, d.meta.get("lang", "")) < train_fraction
    ]
    test = [(d, r) for d, r in labelled if is_heldout(d.key, heldout_fraction)]
    classes = sorted({r for _, r in train})
    if len(classes) < 2:
        raise DataError(f"train-classifier: the seed set has only the labels {classes}; need at least two")
    if not test:
        raise DataError("train-classifier: the held-out split is empty (raise --heldout-fraction)")
    clf = HashedTextClassifier(kind, classes, np.zeros(0), np.zeros(0), rules.raw)
    vectorizer = clf.vectorizer()
    model = LogisticRegression(C=10.0, max_iter=max_iter, class_weight="balanced")
    model.fit(vectorizer.transform([d.text for d, _ in train]), [r for _, r in train])
    clf.classes = [str(c) for c in model.classes_]
    clf.coef, clf.intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float64)
    probs = clf.predict_proba([d.text for d, _ in test])
    predicted = [clf.classes[i] for i in probs.argmax(axis=1)]
    truth = [r for _, r in test]
    labels = sorted(set(truth) | set(clf.classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    report = {
        "kind": kind,
        "train_docs": len(train),
        "heldout_docs": len(test),
        "classes": {
            lab: {
                "precision": round(float(p), 4),
                "recall": round(float(r), 4),
                "f1": round(float(f), 4),
                "support": int(s),
            }
            for lab, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "accuracy": round(float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])), 4),
    }
    return clf, report


# ------------------------------------------------------------------------------- other backends
#
# Every backend has `classes` (roles, sorted), `rules` (embedded label rules or None),
# `predict_proba(texts) -> [len(texts), len(classes)]` and `describe()` (what identifies its
# predictions: split tagging runs check that every rank used the same). Model labels that are not
# roles are mapped with a label map ({model label: role}); labels mapped to one role add up.


def _is_role(label: str) -> bool:
    return label in ("retain", "adjacent") or (label.startswith("forget:") and len(label) > 7)


def parse_label_map(spec: str | None) -> dict[str, str]:
    """`--label-map`: 'LABEL_0=retain,LABEL_1=forget:biology', or a .json/.yaml file holding that mapping."""
    if not spec:
        return {}
    if spec.endswith((".json", ".yaml", ".yml")):
        raw = read_yaml(spec, "--label-map")
        if not isinstance(raw, dict):
            raise DataError(f"--label-map {spec}: expected a mapping of model label -> role")
        pairs = [(str(k), str(v)) for k, v in raw.items()]
    else:
        pairs = []
        for item in spec.split(","):
            label, eq, role = item.partition("=")
            if not eq or not label.strip() or not role.strip():
                raise DataError(f"--label-map: expected LABEL=ROLE[,LABEL=ROLE...], got {item!r}")
            pairs.append((label.strip(), role.strip()))
    for label, role in pairs:
        if not _is_role(role):
            raise DataError(f"--label-map: {label}={role}: expected a role 'retain', 'adjacent' or 'forget:<domain>'")
    return dict(pairs)


def map_labels(labels: list[str], label_map: dict[str, str], where: str) -> tuple[np.ndarray, list[str]]:
    """Model labels -> (a [labels, classes] 0/1 matrix summing label probabilities into roles, the roles)."""
    unknown = sorted(set(label_map) - set(labels))
    if unknown:
        raise DataError(f"--label-map: {unknown} are not labels of {where} (its labels: {labels})")
    roles = [label_map.get(label, label) for label in labels]
    for label, role in zip(labels, roles, strict=True):
        if not _is_role(role):
            raise DataError(
                f"{where}: model label {label!r} is not a role ('retain', 'adjacent', 'forget:<domain>'); "
                f"map it with --label-map {label}=ROLE"
            )
    classes = sorted(set(roles))
    matrix = np.zeros((len(labels), len(classes)))
    for i, role in enumerate(roles):
        matrix[i, classes.index(role)] = 1.0
    return matrix, classes


class FastTextClassifier:
    """A supervised fastText model file (.bin/.ftz); labels `__label__<role>` or mapped to roles.

    fastText reads one line per text, so newlines become spaces; probabilities are those of all
    labels (k=-1), which sum to one for the softmax losses."""

    rules = None

    def __init__(self, path: str | Path, label_map: dict[str, str] | None = None) -> None:
        try:
            import fasttext
        except ImportError:
            raise DataError(
                f"{path}: fastText classifiers need the fasttext module "
                "(pip install -c constraints.txt fasttext-numpy2-wheel==0.9.2)"
            ) from None
        try:
            self.model = fasttext.load_model(str(path))
        except ValueError as exc:
            raise DataError(f"{path}: not a fastText model file ({str(exc).splitlines()[0]})") from None
        self.path = str(path)
        self.labels = [label.removeprefix("__label__") for label in self.model.get_labels()]
        self.label_map = label_map or {}
        self.matrix, self.classes = map_labels(self.labels, self.label_map, self.path)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.classes)))
        column = {f"__label__{label}": i for i, label in enumerate(self.labels)}
        names, probs = self.model.predict([t.replace("\n", " ").replace("\r", " ") for t in texts], k=-1,
                                          threshold=0.0)
        out = np.zeros((len(texts), len(self.labels)))
        for row, (row_names, row_probs) in enumerate(zip(names, probs, strict=True)):
            for name, p in zip(row_names, row_probs, strict=True):
                out[row, column[name]] = min(1.0, float(p))
        return out @ self.matrix

    def describe(self) -> dict:
        return {"kind": "fasttext", "labels": self.labels, "label_map": self.label_map}


class HFSequenceClassifier:
    """A local Hugging Face `AutoModelForSequenceClassification` directory (config + weights + tokenizer).

    Labels come from the config's id2label (mapped to roles); texts are scored in batches of
    `batch_size`, longest first (less padding), truncated to the model's length, on the GPU when one
    is present; softmax over the logits (sigmoid for multi-label models)."""

    rules = None

    def __init__(
        self,
        path: str | Path,
        label_map: dict[str, str] | None = None,
        batch_size: int = 32,
        device: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise DataError(f"--batch-size: expected a positive integer, got {batch_size}")
        if device not in ("auto", "cpu", "cuda"):
            raise DataError(f"--device: expected auto, cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda: no GPU is visible to torch")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   device if device != "auto" else "cpu")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of `sgtm data tag`'s output
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(
                f"{path}: not a loadable AutoModelForSequenceClassification directory "
                f"({str(exc).splitlines()[0]})"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        config = self.model.config
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers: pad with end-of-text (masked anyway)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        self.path, self.batch_size = str(path), batch_size
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self.label_map = label_map or {}
        self.matrix, self.classes = map_labels(self.labels, self.label_map, self.path)
        limits = [n for n in (self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else 512
        self.multi_label = config.problem_type == "multi_label_classification"

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), len(self.labels)))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths batch together
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits.float()
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
                out[rows] = probs.cpu().double().numpy()
        return out @ self.matrix

    def describe(self) -> dict:
        return {"kind": "hf", "model": type(self.model).__name__, "labels": self.labels,
                "label_map": self.label_map, "max_length": self.max_length}


Classifier = HashedTextClassifier | FastTextClassifier | HFSequenceClassifier


def load_classifier(
    spec: str, label_map: dict[str, str] | None = None, batch_size: int = 32, device: str = "auto"
) -> Classifier:
    """`--classifier`: a .npz from `train-classifier`, a fastText .bin/.ftz, or a local HF directory."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise DataError(f"{path}: not a Hugging Face model directory (no config.json)")
        return HFSequenceClassifier(path, label_map, batch_size, device)
    if not path.exists():
        raise DataError(f"{path}: no such classifier file")
    if path.suffix == ".npz":
        if label_map:
            raise DataError(f"--label-map: {path} already predicts roles (a train-classifier model)")
        return HashedTextClassifier.load(path)
    if path.suffix in (".bin", ".ftz"):
        return FastTextClassifier(path, label_map)
    raise DataError(
        f"{path}: unknown classifier (expected a .npz from `sgtm data train-classifier`, a fastText .bin/.ftz, "
        "a Hugging Face model directory, or 'truth')"
    )
