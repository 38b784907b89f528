"""The analyses, one entry each: what `sgtm analyze` offers and what `sgtm report` expects and in
which order. Every module of this package registers its analysis here when imported, so adding
one is one file (plus its line in tools/reproduce_results.sh); the CLI and the report read
:func:`load` instead of keeping lists of their own.

Three places list analyses, each in the order it had before the registry: `sgtm analyze --help`
(``cli_order``), the report's sections (``report_order``) and its "Pending" list
(``pending_order``). Orders are numbers with gaps, so a new analysis slots in without
renumbering the others."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

SWEEPS_HELP = ("sweep result dirs (OUT/<name>) or results.json, cell store dirs (docs/results/cells/<name>), or "
               "bare sweep names (read from the store); stale stored cells are skipped with a warning")


def paper_line(c: dict) -> str:
    """How `sgtm analyze` prints a claim: measured value next to the paper's."""
    return f"  {c['claim']}: here {c['here']} (paper: {c['paper']})"


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """For an analysis whose output comes from another command (no `sgtm analyze` subcommand)."""


@dataclass(frozen=True)
class Analysis:
    """One analysis. ``run(args, command)`` returns the payload written as
    ``<summary>.analysis.json``; ``run=None`` registers only the report's place for outputs of
    another command (`sgtm attack`, `sgtm rmu`)."""

    name: str  # `sgtm analyze NAME`
    help: str
    run: Callable[[argparse.Namespace, str], dict] | None
    arguments: Callable[[argparse.ArgumentParser], None] = no_arguments
    # analysis names (file stems) it writes; the report files a summary under the first that prefixes it
    summaries: tuple[str, ...] = ()
    # report tag (the analysis directory's name) -> summaries tools/reproduce_results.sh produces there;
    # a missing one is listed as pending
    expected: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cli_order: float = 0.0
    report_order: float = 0.0
    pending_order: float = 0.0
    claim_line: Callable[[dict], str] = paper_line


ANALYSES: dict[str, Analysis] = {}
_loaded: list[str] = []  # the package, once its modules are imported


def register(analysis: Analysis) -> Analysis:
    """Add an analysis (at import of its module); one name, one analysis."""
    if analysis.name in ANALYSES and ANALYSES[analysis.name] != analysis:
        raise ValueError(f"analysis {analysis.name!r} registered twice")
    ANALYSES[analysis.name] = analysis
    return analysis


def load() -> dict[str, Analysis]:
    """Every analysis of this package, by name: each module is imported (once), which registers it."""
    package = __name__.rsplit(".", 1)[0]
    if not _loaded:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{info.name}")
        _loaded.append(package)
    return ANALYSES


def commands() -> list[Analysis]:
    """The `sgtm analyze` subcommands, in help order."""
    return sorted((a for a in load().values() if a.run is not None), key=lambda a: a.cli_order)


def report_order() -> list[str]:
    """Summary-name prefixes in the order the report shows their sections."""
    return [s for a in sorted(load().values(), key=lambda a: a.report_order) for s in a.summaries]


def expected() -> dict[str, list[str]]:
    """Report tag -> the summaries expected under it, in the order the report lists pending ones."""
    out: dict[str, list[str]] = {}
    for a in sorted(load().values(), key=lambda a: a.pending_order):
        for tag, names in a.expected.items():
            out.setdefault(tag, []).extend(names)
    return out


def sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sweeps`` and ``--out``: what every analysis of sweep cells takes."""
    parser.add_argument("--sweeps", nargs="+", required=True, help=SWEEPS_HELP)
    parser.add_argument("--out", required=True, help="directory for <analysis>.analysis.json and .png")


def on_sweeps(fn: Callable[[list[str], str, str], dict]) -> Callable[[argparse.Namespace, str], dict]:
    """``run`` for an analysis of sweep cells: ``fn(sweeps, out, command)``."""

    def run(args: argparse.Namespace, command: str) -> dict:
        return fn(args.sweeps, args.out, command)

    return run
