"""Ground-truth roles of documents, derived from their metadata by YAML rules, and their codes.

A role is 'retain', 'adjacent' or 'forget:<domain>'. The batch's `true_labels` tensor carries the
role as a :class:`pipeline.codes.TrueLabel`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from pipeline.codes import TrueLabel
from pipeline.config import ConfigError
from pipeline.config import check_role as config_check_role
from pipeline.data.errors import DataError, read_yaml


def check_role(role: str, domains: list[str], where: str) -> str:
    """The config's role grammar (:func:`pipeline.config.check_role`), as a DataError."""
    try:
        return config_check_role(role, domains, where)
    except ConfigError as exc:
        raise DataError(str(exc)) from None


def true_code(role: str, domains: list[str]) -> int:
    if role == "retain":
        return TrueLabel.RETAIN
    if role == "adjacent":
        return TrueLabel.ADJACENT
    return TrueLabel.FORGET + domains.index(role[7:])


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from its arguments: per-document draws that ignore reading order."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """The train/held-out split by document key (parallel EN/ES stories share keys: they split together)."""
    return fraction > 0 and unit_hash("heldout", key) < fraction


@dataclass
class LabelRules:
    """First matching rule wins; each rule maps metadata fields (regex, case-insensitive) to a role."""

    domains: list[str]
    default: str = "retain"
    rules: list[tuple[dict[str, re.Pattern], str]] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> LabelRules:
        if not isinstance(raw, dict) or not isinstance(raw.get("domains"), list) or not raw["domains"]:
            raise DataError(f"{where}: domains: expected a non-empty list of forget domain names")
        domains = [str(d) for d in raw["domains"]]
        default = check_role(str(raw.get("default", "retain")), domains, f"{where}: default")
        rules = []
        for i, rule in enumerate(raw.get("rules") or []):
            if not isinstance(rule, dict) or "label" not in rule:
                raise DataError(f"{where}: rules[{i}]: expected a mapping with 'label' and field patterns")
            label = check_role(str(rule["label"]), domains, f"{where}: rules[{i}].label")
            try:
                patterns = {k: re.compile(str(v), re.IGNORECASE) for k, v in rule.items() if k != "label"}
            except re.error as exc:
                raise DataError(f"{where}: rules[{i}]: bad regex ({exc})") from None
            rules.append((patterns, label))
        return cls(domains, default, rules, raw)

    @classmethod
    def load(cls, path: str) -> LabelRules:
        return cls.from_dict(read_yaml(path, "label rules"), path)

    def role(self, meta: dict) -> str:
        for patterns, label in self.rules:
            if all(p.search(str(meta.get(k, ""))) for k, p in patterns.items()):
                return label
        return self.default
