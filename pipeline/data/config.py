"""The `data:` section of an experiment: sources, filter policy, tagging/noise settings, loader knobs.

`DataConfig.from_dict(raw)` validates everything up front and raises `DataError` (a ValueError) with
a one-line message naming the key, e.g. `data.sources[0].weight: expected a positive number, got -1`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.errors import DataError
from pipeline.data.labels import check_role

FILTERS = ("none", "weak", "strict")
TAG_SOURCES = ("simulated", "classifier")
GRANULARITIES = ("document", "paragraph")


@dataclass
class SourceConfig:
    path: str  # shard directory (manifest.json + tars) written by `sgtm data shard`
    weight: float = 1.0  # share of tokens drawn from this source (before filtering), relative
    tags: str | None = None  # sidecar directory written by `sgtm data tag` (needed for classifier tagging)
    true_label: str | None = None  # ground truth for every document of the source, e.g. 'forget:spanish'


@dataclass
class TaggingConfig:
    """How per-document tags become modes.

    source=classifier: the tag sidecars' probabilities go through the thresholds.
    source=simulated: true labels plus the paper's controlled noise (per document, seeded by `seed`).
    Both: a confident-retain document gets RETAIN with probability `retain_fraction`, else UNLABELLED.
    """

    source: str = "simulated"
    forget_threshold: float = 0.5  # P(forget:d) >= this -> forget:d
    retain_threshold: float = 0.5  # P(retain) >= this -> retain candidate
    adjacent_threshold: float = 0.5  # P(adjacent) >= this -> dropped by the strict filter
    retain_fraction: float = 0.25  # share of confident-retain docs put in RETAIN mode (paper: 0.10-0.25)
    undiscovered_rate: float = 0.0  # simulated: share of true forget docs left UNLABELLED (1 - recall)
    false_positive_rate: float = 0.0  # simulated: share of true non-forget docs tagged forget
    precision: float | None = None  # simulated: alternative to false_positive_rate (converted with counts)
    granularity: str = "document"  # 'paragraph': classifier spans set per-token modes inside a document
    seed: int = 0  # seeds every per-document draw (independent of the loader's shuffling seed)


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    domains: list[str]  # forget domains, in the order of sgtm.domains (mode FORGET+d)
    tokenizer: str = "gpt2"  # 'gpt2' or a tokenizer .json; must match every manifest's hash
    filter: str = "none"  # none | weak (drop forget-tagged docs) | strict (also drop adjacent docs)
    tagging: TaggingConfig = field(default_factory=TaggingConfig)
    heldout_fraction: float = 0.05  # documents held out of training (by key hash) for evaluation
    shuffle_buffer: int = 2048  # documents in each worker's shuffle buffer
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    epochs: int | None = None  # None: cycle forever; N: stop after N passes (then a padded last batch)
    skip_bad_shards: bool = False  # count and report corrupt shards instead of failing
    # Keep only documents whose true label is in this list (e.g. ['forget:spanish'] for an
    # attacker's forget-only stream); None keeps everything.
    keep_true: list[str] | None = None

    @classmethod
    def from_dict(cls, raw: Any, key: str = "data") -> DataConfig:
        if isinstance(raw, DataConfig):
            raw = raw.to_dict()
        _mapping(raw, key)
        _known(raw, cls, key)
        if "sources" not in raw or not isinstance(raw["sources"], list) or not raw["sources"]:
            raise DataError(f"{key}.sources: expected a non-empty list of {{path, weight, ...}}")
        if "domains" not in raw or not isinstance(raw["domains"], list) or not raw["domains"]:
            raise DataError(f"{key}.domains: expected a non-empty list of forget domain names")
        domains = [_string(d, f"{key}.domains[{i}]") for i, d in enumerate(raw["domains"])]
        if len(set(domains)) != len(domains):
            raise DataError(f"{key}.domains: duplicate names in {domains}")
        sources = []
        for i, src in enumerate(raw["sources"]):
            where = f"{key}.sources[{i}]"
            _mapping(src, where)
            _known(src, SourceConfig, where)
            if "path" not in src:
                raise DataError(f"{where}.path: required (a shard directory)")
            true_label = src.get("true_label")
            if true_label is not None:
                check_role(_string(true_label, f"{where}.true_label"), domains, f"{where}.true_label")
            sources.append(
                SourceConfig(
                    path=_string(src["path"], f"{where}.path"),
                    weight=_positive(src.get("weight", 1.0), f"{where}.weight"),
                    tags=None if src.get("tags") is None else _string(src["tags"], f"{where}.tags"),
                    true_label=true_label,
                )
            )
        tag_raw = raw.get("tagging", {}) or {}
        _mapping(tag_raw, f"{key}.tagging")
        _known(tag_raw, TaggingConfig, f"{key}.tagging")
        tk = f"{key}.tagging"
        tagging = TaggingConfig(
            source=_choice(tag_raw.get("source", "simulated"), TAG_SOURCES, f"{tk}.source"),
            forget_threshold=_fraction(tag_raw.get("forget_threshold", 0.5), f"{tk}.forget_threshold"),
            retain_threshold=_fraction(tag_raw.get("retain_threshold", 0.5), f"{tk}.retain_threshold"),
            adjacent_threshold=_fraction(tag_raw.get("adjacent_threshold", 0.5), f"{tk}.adjacent_threshold"),
            retain_fraction=_fraction(tag_raw.get("retain_fraction", 0.25), f"{tk}.retain_fraction"),
            undiscovered_rate=_fraction(tag_raw.get("undiscovered_rate", 0.0), f"{tk}.undiscovered_rate"),
            false_positive_rate=_fraction(
                tag_raw.get("false_positive_rate", 0.0), f"{tk}.false_positive_rate"
            ),
            precision=None
            if tag_raw.get("precision") is None
            else _fraction(tag_raw["precision"], f"{tk}.precision", open_low=True),
            granularity=_choice(tag_raw.get("granularity", "document"), GRANULARITIES, f"{tk}.granularity"),
            seed=_integer(tag_raw.get("seed", 0), f"{tk}.seed", minimum=0),
        )
        if tagging.precision is not None and tagging.false_positive_rate:
            raise DataError(f"{tk}.precision: give either precision or false_positive_rate, not both")
        epochs = raw.get("epochs")
        keep_true = raw.get("keep_true")
        if keep_true is not None:
            if not isinstance(keep_true, list) or not keep_true:
                raise DataError(f"{key}.keep_true: expected a non-empty list of true labels, got {keep_true!r}")
            for i, role in enumerate(keep_true):
                check_role(_string(role, f"{key}.keep_true[{i}]"), domains, f"{key}.keep_true[{i}]")
        config = cls(
            sources=sources,
            domains=domains,
            tokenizer=_string(raw.get("tokenizer", "gpt2"), f"{key}.tokenizer"),
            filter=_choice(raw.get("filter", "none"), FILTERS, f"{key}.filter"),
            tagging=tagging,
            heldout_fraction=_fraction(raw.get("heldout_fraction", 0.05), f"{key}.heldout_fraction"),
            shuffle_buffer=_integer(raw.get("shuffle_buffer", 2048), f"{key}.shuffle_buffer", minimum=1),
            num_workers=_integer(raw.get("num_workers", 0), f"{key}.num_workers", minimum=0),
            epochs=None if epochs is None else _integer(epochs, f"{key}.epochs", minimum=1),
            skip_bad_shards=_boolean(raw.get("skip_bad_shards", False), f"{key}.skip_bad_shards"),
            keep_true=None if keep_true is None else list(keep_true),
        )
        if config.tagging.source == "classifier":
            for i, src in enumerate(config.sources):
                if src.tags is None:
                    raise DataError(f"{key}.sources[{i}].tags: required when {tk}.source is 'classifier'")
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mapping(value: Any, key: str) -> None:
    if not isinstance(value, dict):
        raise DataError(f"{key}: expected a mapping, got {value!r}")


def _known(raw: dict, cls: type, key: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in names:
            raise DataError(f"{key}.{name}: unknown key (expected one of {sorted(names)})")


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise DataError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def _fraction(value: Any, key: str, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value <= 1
    if not ok or (open_low and value == 0):
        raise DataError(f"{key}: expected a number in {'(0' if open_low else '[0'}, 1], got {value!r}")
    return float(value)


def _integer(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise DataError(f"{key}: expected true or false, got {value!r}")
    return value


def _choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise DataError(f"{key}: expected one of {list(choices)}, got {value!r}")
    return value
