"""Equivalence of tensors computed under two layouts (TP / SP / PP / EP against one process).

One rule for every such comparison, per tensor and relative to that tensor's scale:

    |got - ref| <= SCALE * max|ref| + RTOL * |ref|     element by element

An absolute tolerance fixed in advance (the old ``atol=1e-5, rtol=0``) is blind on the tiny test
models: the median QKV gradient entry is about 1e-5 there. Scaling dQ by 1.05 under TP=2 or SP moves
the QKV weight's gradient by 2e-4 to 4e-4 of its max|ref| (3e-6 to 6e-6 absolute: the old rule
passed it); this rule fails it with a margin of 20x or more, and passes the honest fp32
reduction-order differences with a margin of 13x or more. Measured max|got - ref| / max|ref|,
worst tensor per layout (SGTM_COMPARE_LOG records them):

    TP=2 gradients (gpt-neo, llama) ........................... 7.6e-7
    TP=2 / TP=4 GQA and MQA (replicated KV) gradients ........ 5.2e-7
    TP=2 + SP gradients, per-token losses, logits, hidden ..... 6.7e-7
    EP=2 x DP=2, EP=2 x TP=2 gradients ......................... 4.9e-7
    PP=2 x TP=2 per-token losses (full, ablated) ............... 9.5e-8
    EP=2 parameters after 6 Adam steps ......................... 5.0e-5  (SCALE_AFTER_STEPS = 5e-4)
    dQ x 1.05 under TP=2 / TP=2 + SP, QKV weights ......... 2.2e-4 to 4.1e-4  (must fail)

Scalars (losses) follow the same rule: a bound of 1.1e-5 x |ref|; the measured differences are 0
or one fp32 step.

An all-zero ``ref`` demands an all-zero ``got``; non-finite entries must match exactly.
Set ``SGTM_COMPARE_LOG=/path/file.jsonl`` to append one line per comparison (name, scale, the
relative error) when re-measuring the margins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import torch

SCALE = 1e-5  # of max|ref|: the absolute part of the bound, per tensor
RTOL = 1e-6  # of |ref| element by element: the (small) relative part
# Parameters after optimizer steps: Adam divides each gradient entry by its own RMS, so an entry
# whose gradient is at rounding level moves by a different fraction of the learning rate.
SCALE_AFTER_STEPS = 5e-4


def mismatch(got, ref, name: str = "tensor", scale: float = SCALE, rtol: float = RTOL) -> str | None:
    """None when ``got`` equals ``ref`` under the rule above; else one line naming the tensor, how
    many elements are out, and the worst one (index, both values, its error against the bound)."""
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    if got.shape != ref.shape:
        return f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    g, r = _f64(got), _f64(ref)
    finite = torch.isfinite(r)
    same = (g[~finite] == r[~finite]) | (g[~finite].isnan() & r[~finite].isnan())
    if not torch.equal(finite, torch.isfinite(g)) or not bool(same.all()):
        return f"{name}: non-finite entries differ from the reference's"
    g, r = g[finite], r[finite]  # flattened; indices below are reported in the full shape
    top = float(r.abs().max()) if r.numel() else 0.0
    bound = scale * top + rtol * r.abs()
    err = (g - r).abs()
    _log(name, top, err, scale, rtol)
    bad = err > bound
    if not bool(bad.any()):
        return None
    worst = int(torch.argmax(err - bound))
    index = _unravel(int(torch.nonzero(finite.flatten())[worst]), tuple(ref.shape))
    rel = f" = {float(err[worst]) / top:.3g} x max|ref|" if top else ""
    return (f"{name}: {int(bad.sum())}/{r.numel()} elements differ by more than {scale:g} x max|ref| + "
            f"{rtol:g} x |ref| (max|ref| = {top:.4g}); worst at {index}: got {float(g[worst]):.8g}, "
            f"ref {float(r[worst]):.8g}, |diff| {float(err[worst]):.3g}{rel} (bound {float(bound[worst]):.3g})")


def mismatches(got: Mapping, ref: Mapping, names: Iterable[str] | None = None, **tol) -> list[str]:
    """One ``mismatch`` line per named tensor that differs (``names``: default every key of ``ref``,
    which ``got`` must hold)."""
    lines = []
    for n in (list(ref) if names is None else names):
        if n not in got:
            lines.append(f"{n}: missing")
            continue
        line = mismatch(got[n], ref[n], name=n, **tol)
        if line:
            lines.append(line)
    return lines


def assert_equivalent(got, ref, name: str = "tensor", **tol) -> None:
    """AssertionError (the ``mismatch`` line) unless ``got`` equals ``ref`` under the rule."""
    line = mismatch(got, ref, name=name, **tol)
    if line:
        raise AssertionError(line)


def assert_all_equivalent(got: Mapping, ref: Mapping, names: Iterable[str] | None = None, **tol) -> None:
    """``assert_equivalent`` over named tensors; the error lists every tensor that differs."""
    lines = mismatches(got, ref, names, **tol)
    if lines:
        raise AssertionError(f"{len(lines)} tensor(s) differ:\n" + "\n".join(lines))


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to("cpu", torch.float64)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _log(name: str, top: float, err: torch.Tensor, scale: float, rtol: float) -> None:
    path = os.environ.get("SGTM_COMPARE_LOG")
    if not path:
        return
    e = float(err.max()) if err.numel() else 0.0
    with open(path, "a") as f:
        f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "name": name, "max_ref": top,
                            "max_err": e, "rel": e / top if top else (0.0 if e == 0 else None),
                            "scale": scale, "rtol": rtol}) + "\n")
