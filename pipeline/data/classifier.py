"""Upstream domain classifiers: hashed n-grams + logistic regression (words for topics, chars for language).

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

from pipeline.data.errors import DataError
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
