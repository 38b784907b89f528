"""`sgtm data ...` subcommands (filled in by the data issue)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="tokenizers, shards, tagging")
    p.set_defaults(func=lambda args: p.print_help() or 0)
