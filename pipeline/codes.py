"""Every integer code the pipeline uses, in one place, and the table of who may update what.

* :class:`Mode` - the per-token mode every batch carries (``modes`` [B, S]). A mode belongs to a
  token position: the position whose input token is read and whose next token is predicted.
* :class:`ParamClass` - the class of a parameter slice (forget domain ``d`` is the plain int
  ``d >= 0``; the negative members are the non-forget classes).
* :class:`TrueLabel` - the ground-truth role of a document, in the batch's ``true_labels``.
* :class:`ClipGroup` - the gradient-clipping groups (each has its own norm and coefficient).

:data:`MAY_UPDATE` is the one table saying which token modes may update which parameter class
under each strategy; :meth:`pipeline.sgtm.masking.TokenMasks.build` reads it and
``sgtm partition`` prints it.
"""

from __future__ import annotations

from enum import IntEnum

MAX_DOMAINS = 32


class Mode(IntEnum):
    UNLABELLED = 0  # normal forward, every parameter learns
    RETAIN = 1  # forget heads/units switched off in the forward pass
    FORGET = 2  # confidently labelled as forget domain d: FORGET + d; only forget[d] learns


class ParamClass(IntEnum):
    """Non-forget slice classes; forget parameters of domain ``d`` have class ``d`` (>= 0)."""

    RETAIN = -1  # split-matrix slices that forget-labelled tokens never update
    JOINT_NON_FORGET = -2  # joint parameters (embeddings, norms, head) forget tokens may not update
    JOINT_ALL = -3  # joint parameters every token updates


class TrueLabel(IntEnum):
    PAD = -1
    RETAIN = 0  # retain / other
    FORGET = 1  # forget domain d is FORGET + d
    ADJACENT = 1 + MAX_DOMAINS  # one code after every possible forget domain


class ClipGroup(IntEnum):
    """Retain slices and joint(non_forget) share a norm (only non-forget tokens reach them);
    joint(all) has its own, so a forget gradient's size never sets the retain coefficient;
    forget domain d is FORGET + d."""

    RETAIN = 0
    JOINT_ALL = 1
    FORGET = 2


def clip_group(cls: int) -> int:
    """The clip group of a parameter-slice class."""
    if cls >= 0:
        return ClipGroup.FORGET + cls
    return ClipGroup.JOINT_ALL if cls == ParamClass.JOINT_ALL else ClipGroup.RETAIN


def mode_name(mode: int, domains: list[str]) -> str:
    if mode == Mode.UNLABELLED:
        return "unlabelled"
    if mode == Mode.RETAIN:
        return "retain"
    return f"forget:{domains[mode - Mode.FORGET]}"


def class_name(cls: int, domains: list[str]) -> str:
    if cls >= 0:
        return f"forget[{domains[cls]}]"
    return {ParamClass.RETAIN: "retain", ParamClass.JOINT_NON_FORGET: "joint(non_forget)",
            ParamClass.JOINT_ALL: "joint(all)"}[ParamClass(cls)]


# Which token modes may update which parameter class, per strategy. Token kinds: 'unlabelled',
# 'retain' (retain mode), 'own_forget' (forget tokens of the class's own domain) and
# 'other_forget' (forget tokens of any other domain). Parameter kinds: 'retain', 'joint_non_forget',
# 'joint_all', 'forget' (forget[d], for every d). A (strategy, parameter kind) missing a token
# kind masks that kind's tokens out of the parameter's gradient where the gradient is made.
# Gradient routing and activation masking change the forward/backward flow of activations
# (pipeline/sgtm/masking.py) but honour the joint policies exactly as SGTM does, so a method
# comparison differs only in the method.
ALL_TOKENS = frozenset({"unlabelled", "retain", "own_forget", "other_forget"})
NON_FORGET_TOKENS = frozenset({"unlabelled", "retain"})
_ALL, _NON = ALL_TOKENS, NON_FORGET_TOKENS
MAY_UPDATE: dict[str, dict[str, frozenset[str]]] = {
    "sgtm": {"retain": _NON, "joint_non_forget": _NON, "joint_all": _ALL, "forget": _NON | {"own_forget"}},
    "gradient_routing": {"retain": _ALL, "joint_non_forget": _NON, "joint_all": _ALL, "forget": _ALL},
    "activation_masking": {"retain": _ALL, "joint_non_forget": _NON, "joint_all": _ALL, "forget": _ALL},
    "none": {"retain": _ALL, "joint_non_forget": _ALL, "joint_all": _ALL, "forget": _ALL},
}
STRATEGIES = tuple(MAY_UPDATE)


def param_kind(cls: int) -> str:
    if cls >= 0:
        return "forget"
    return {ParamClass.RETAIN: "retain", ParamClass.JOINT_NON_FORGET: "joint_non_forget",
            ParamClass.JOINT_ALL: "joint_all"}[ParamClass(cls)]


def update_table(strategy: str) -> str:
    """The rows of :data:`MAY_UPDATE` for one strategy, as ``sgtm partition`` prints them."""
    rows = MAY_UPDATE[strategy]
    kinds = ("unlabelled", "retain", "own_forget", "other_forget")
    head = f"{'parameter class':<18}" + "".join(f"{k:>14}" for k in kinds)
    lines = [f"who may update what (strategy {strategy}; token modes across):", head]
    for pk in ("retain", "joint_non_forget", "joint_all", "forget"):
        lines.append(f"{pk:<18}" + "".join(f"{'yes' if k in rows[pk] else 'no':>14}" for k in kinds))
    return "\n".join(lines)
