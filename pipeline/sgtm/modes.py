"""The per-token mode tensor: what every batch carries so masking can be exact in mixed batches.

A mode is a small integer per token position (the position whose input token is read and whose
next token is predicted):

    UNLABELLED (0)  normal forward, every parameter learns
    RETAIN     (1)  forget heads/units switched off in the forward pass
    FORGET + d (2+d) confidently labelled as forget domain d: only forget[d] parameters learn

Domains are numbered by their order in the config's ``sgtm.domains`` list.
"""

from __future__ import annotations

UNLABELLED = 0
RETAIN = 1
FORGET = 2  # forget domain d is FORGET + d

MAX_DOMAINS = 32


def forget_mode(domain: int) -> int:
    return FORGET + domain


def parse_mode(text: str, domains: list[str]) -> int:
    """'unlabelled' | 'retain' | 'forget:<domain>' -> integer mode."""
    if text == "unlabelled":
        return UNLABELLED
    if text == "retain":
        return RETAIN
    if text.startswith("forget:") and text[7:] in domains:
        return FORGET + domains.index(text[7:])
    raise ValueError(f"mode {text!r}: expected 'unlabelled', 'retain' or 'forget:<one of {domains}>'")


def mode_name(mode: int, domains: list[str]) -> str:
    if mode == UNLABELLED:
        return "unlabelled"
    if mode == RETAIN:
        return "retain"
    return f"forget:{domains[mode - FORGET]}"
