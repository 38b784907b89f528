"""A method is a masking strategy x a data filter: the one registry every list, map and plot reads.

* ``strategy`` is ``sgtm.strategy``, a row of :data:`pipeline.codes.MAY_UPDATE` (which tokens may
  update which parameters; ``none`` opens every permission);
* ``filter`` is ``data.filter`` (which tagged documents or spans the loader drops:
  ``pipeline.data.loader.apply_filter``).

A method that ``ablates`` ships its ablated model (forget parameters zeroed: ``sgtm ablate``); the
others ship the full model. ``name`` is what sweeps, analyses, the demo and the cell store call it
(``labels.method``); ``label`` and ``colour`` are how plots draw it (the label is the name itself
today: the committed figures print names). A ``variant_of`` row is a method told apart by how it
was made rather than by its strategy x filter (a perfectly tagged weak filter, RMU after no
filter): it has a colour and a label, and :func:`method_of` never returns it.

A new masking strategy is a row of ``MAY_UPDATE`` and a row here; a new filter policy is a value
of ``data.filter`` and a row here (docs/architecture.md, "Adding a strategy or a filter").
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from pipeline.codes import STRATEGIES
from pipeline.config import DataConfig


@dataclass(frozen=True)
class Method:
    name: str
    strategy: str  # sgtm.strategy
    filter: str  # data.filter
    ablates: bool  # the deployed model is the ablated one
    label: str  # what plots print
    colour: str  # matplotlib colour of its points and curves
    short: str = ""  # a short name for benchmark tables ('gr'); default: the name
    variant_of: str | None = None


METHODS: tuple[Method, ...] = (
    Method("sgtm", "sgtm", "none", True, "sgtm", "tab:red"),
    Method("gradient_routing", "gradient_routing", "none", True, "gradient_routing", "tab:green", short="gr"),
    Method("activation_masking", "activation_masking", "none", True, "activation_masking", "tab:purple",
           short="am"),
    # strategy none: plain training on what the filter leaves ('none' is how the benchmark names it)
    Method("no_filter", "none", "none", False, "no_filter", "tab:gray", short="none"),
    Method("weak_filter", "none", "weak", False, "weak_filter", "tab:blue"),  # drops forget-tagged data
    Method("strict_filter", "none", "strict", False, "strict_filter", "tab:cyan"),  # ... and adjacent-tagged
    # the weak filter with every forget document tagged (simulated source, undiscovered_rate 0)
    Method("perfect_filter", "none", "weak", False, "perfect_filter", "tab:brown", variant_of="weak_filter"),
    # a no-filter model after RMU unlearning (`sgtm rmu`)
    Method("rmu", "none", "none", False, "rmu", "tab:orange", variant_of="no_filter"),
)
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
COLOURS: dict[str, str] = {m.name: m.colour for m in METHODS}
FILTERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(DataConfig)["filter"])


def method(name: str) -> Method:
    return BY_NAME[name]


def method_name(strategy: str, filter: str) -> str:
    """The method a strategy x filter runs. A masking strategy names it whatever the filter (SGTM
    on filtered data is still ``sgtm``); strategy ``none`` is named by its filter."""
    for m in METHODS:
        if m.variant_of is None and m.strategy == strategy and (m.filter == filter or strategy != "none"):
            return m.name
    raise KeyError(filter if strategy == "none" else strategy)


def method_of(cfg: Any) -> str:
    """The method an experiment config runs (``sgtm.strategy`` x ``data.filter``; no data section:
    no filter)."""
    return method_name(cfg.sgtm.strategy, cfg.data.filter if cfg.data is not None else "none")


def ablates(strategy: str) -> bool:
    """Whether a strategy's deployed model is the ablated one."""
    return any(m.ablates for m in METHODS if m.strategy == strategy and m.variant_of is None)


def overrides(name: str) -> list[str]:
    """The config overrides that make an experiment run method ``name``."""
    m = BY_NAME[name]
    return [f"sgtm.strategy={m.strategy}", f"data.filter={m.filter}"]


def short_names() -> dict[str, str]:
    """Strategy -> its short name in benchmark tables (the method each strategy runs unfiltered)."""
    return {s: (BY_NAME[method_name(s, "none")].short or method_name(s, "none")) for s in STRATEGIES}


def _check() -> None:
    """Every strategy of ``MAY_UPDATE`` and every ``data.filter`` value names a method."""
    for s in STRATEGIES:
        method_name(s, "none")
    for f in FILTERS:
        method_name("none", f)
    for m in METHODS:
        if m.strategy not in STRATEGIES or m.filter not in FILTERS:
            raise ValueError(f"method {m.name}: unknown strategy {m.strategy!r} or filter {m.filter!r}")


_check()
