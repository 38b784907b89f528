"""The method registry (pipeline/sgtm/methods.py): it covers every strategy and filter, and it
gives exactly what the lists and maps it replaced gave."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from pipeline.codes import STRATEGIES
from pipeline.sgtm import methods


def test_every_strategy_and_filter_names_a_method():
    assert set(STRATEGIES) <= {m.strategy for m in methods.METHODS}
    assert set(methods.FILTERS) == {"none", "weak", "strict"}
    for s, f in itertools.product(STRATEGIES, methods.FILTERS):
        assert methods.method_name(s, f) in methods.BY_NAME


def test_names_as_the_replaced_maps_gave_them():
    old = {"none": "no_filter", "weak": "weak_filter", "strict": "strict_filter"}  # common.py, finetune.py
    for s, f in itertools.product(STRATEGIES, methods.FILTERS):
        assert methods.method_name(s, f) == (s if s != "none" else old[f])
    with pytest.raises(KeyError):
        methods.method_name("none", "bogus")
    cfg = SimpleNamespace(sgtm=SimpleNamespace(strategy="none"), data=SimpleNamespace(filter="strict"))
    assert methods.method_of(cfg) == "strict_filter"
    assert methods.method_of(SimpleNamespace(sgtm=SimpleNamespace(strategy="sgtm"), data=None)) == "sgtm"


def test_ablation_colours_demo_and_benchmark_as_before():
    assert tuple(s for s in STRATEGIES if methods.ablates(s)) == ("sgtm", "gradient_routing", "activation_masking")
    assert methods.COLOURS == {"sgtm": "tab:red", "weak_filter": "tab:blue", "strict_filter": "tab:cyan",
                               "no_filter": "tab:gray", "gradient_routing": "tab:green",
                               "activation_masking": "tab:purple", "rmu": "tab:orange", "perfect_filter": "tab:brown"}
    assert methods.overrides("weak_filter") == ["sgtm.strategy=none", "data.filter=weak"]
    assert methods.overrides("sgtm") == ["sgtm.strategy=sgtm", "data.filter=none"]
    assert methods.short_names() == {"none": "none", "sgtm": "sgtm", "gradient_routing": "gr",
                                     "activation_masking": "am"}
    assert all(m.label == m.name for m in methods.METHODS)  # the committed figures print names
