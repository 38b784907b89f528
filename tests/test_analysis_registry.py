"""The analysis registry is the one list of analyses: `sgtm analyze` offers exactly its commands,
each module of the package registers (or is a shared helper), and every summary the report
expects has a place in the report's order."""

from __future__ import annotations

import pkgutil

from pipeline.experiments import analyses
from pipeline.experiments.analyses import registry

HELPERS = {"registry", "claims", "plots"}  # shared modules: no analysis of their own


def _analyze_subcommands() -> list[str]:
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    analyze = sub.choices["analyze"]
    asub = next(a for a in analyze._subparsers._group_actions if a.dest == "analysis")
    return list(asub.choices)


def test_sgtm_analyze_offers_the_registry_commands_in_help_order():
    assert _analyze_subcommands() == [a.name for a in registry.commands()]


def test_every_module_is_one_analysis_named_after_it():
    modules = {m.name for m in pkgutil.iter_modules(analyses.__path__)} - HELPERS
    assert modules == {a.name.replace("-", "_") for a in registry.commands()}


def test_report_positions_are_unique():
    prefixes = registry.report_order()
    assert len(prefixes) == len(set(prefixes))


def test_every_expected_summary_has_a_place_in_the_report():
    order = registry.report_order()
    for tag, names in registry.expected().items():
        for name in names:
            assert any(name.startswith(p) for p in order), f"{tag}/{name} has no report position"
