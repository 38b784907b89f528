"""The analysis math, free of I/O so tests can check it on inputs with known answers."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95  # two-sided level of every interval (seeds, fits)


def nonincreasing(y: Sequence[float], w: Sequence[float] | None = None) -> np.ndarray:
    """Least-squares non-increasing fit of ``y`` (pool adjacent violators): the dose-response of
    forget loss in N must fall, so seed noise that makes it rise is pooled away."""
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=float)
    blocks: list[list[float]] = []  # [value, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.concatenate([[v] * c for v, _, c in blocks]) if blocks else y


def dose_equivalent(doses: Sequence[float], losses: Sequence[float], target: float) -> dict:
    """The forget-token dose N at which the dose-response curve (forget loss of plain runs trained on
    retain data plus N forget tokens) reaches ``target``.

    The curve is made non-increasing, then interpolated linearly in log N between positive doses
    and linearly in N between dose 0 and the smallest positive dose. Returns ``{"n": N, "bound":
    None | "below" | "above"}``: ``below`` when ``target`` is above the N=0 loss (the run forgot
    more than the perfect filter: N = 0), ``above`` when it is below the largest dose's loss (N is at
    least the largest dose; reported as that dose)."""
    order = np.argsort(doses)
    n = np.asarray(doses, dtype=float)[order]
    y = nonincreasing(np.asarray(losses, dtype=float)[order])
    if len(n) < 2:
        raise ValueError("dose-response: need at least two doses")
    if target >= y[0]:
        return {"n": float(n[0]), "bound": "below" if target > y[0] else None}
    if target <= y[-1]:
        return {"n": float(n[-1]), "bound": "above" if target < y[-1] else None}
    i = int(np.nonzero(y <= target)[0][0])  # first dose whose loss is at or below target
    n0, n1, y0, y1 = n[i - 1], n[i], y[i - 1], y[i]
    if y0 == y1:
        return {"n": float(n0), "bound": None}
    t = (y0 - target) / (y0 - y1)
    if n0 <= 0:
        return {"n": float(n0 + t * (n1 - n0)), "bound": None}
    return {"n": float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))), "bound": None}


# Below this R^2 (log space) a power-law fit explains too little of the loss to convert a loss
# into compute: the penalty is reported as "no penalty: the fit is flat", not as a number.
POWER_LAW_R2_FLOOR = 0.5
# A loss span (log space) this small relative to the losses is rounding, not a trend.
_FLAT_LOSS_RTOL = 1e-12
_LOG_FLOAT_MAX = math.log(sys.float_info.max)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], confidence: float = CONFIDENCE,
                  r2_floor: float = POWER_LAW_R2_FLOOR) -> dict:
    """Least squares of log L = log a - b log C: a, b, R^2 (log space) and the exponent's two-sided
    t-interval from the slope's standard error (``b_lo``/``b_hi``; None with two points, which
    leave no degree of freedom).

    ``flat`` is True, with ``reason``, when the fit cannot turn a loss into a compute: the interval
    contains 0 (or there is none), R^2 is below ``r2_floor``, or the loss does not change at all.
    A flat fit's b is rounding noise whose sign decides whether C = (L/a)^(-1/b) is 0 or overflows,
    so callers report "no penalty: the fit is flat" instead of a number. Raises ValueError only
    when there is nothing to fit (fewer than two distinct compute values, non-positive inputs)."""
    x = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if x.shape != y.shape or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))
                                  and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("power-law fit: compute and loss must be paired, finite and positive")
    x, y = np.log(x), np.log(y)
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError("power-law fit: need at least two distinct compute values")
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc ** 2).sum())
    slope = float((xc * yc).sum()) / sxx
    intercept = float(y.mean()) - slope * float(x.mean())
    sse = float(((y - intercept - slope * x) ** 2).sum())
    sst = float((yc ** 2).sum())
    b = 0.0 - slope  # not -0.0 for a perfectly flat line
    constant = float(np.ptp(y)) <= _FLAT_LOSS_RTOL * max(1.0, float(np.abs(y).max()))
    r2 = None if constant or sst == 0 else 1.0 - sse / sst
    out = {"a": float(math.exp(intercept)), "b": b, "b_lo": None, "b_hi": None, "b_se": None,
           "confidence": confidence, "r2": r2, "points": n, "r2_floor": r2_floor, "flat": False, "reason": None}
    if n > 2:
        se = math.sqrt(sse / (n - 2) / sxx)
        half = _t_quantile(n - 2, confidence) * se
        out.update(b_se=se, b_lo=b - half, b_hi=b + half)
    pct = f"{100 * confidence:g}%"
    if constant:
        reason = "the loss is the same at every compute"
    elif n == 2:
        reason = "2 points leave no interval on the exponent (3 needed)"
    elif out["b_lo"] <= 0.0 <= out["b_hi"]:
        reason = f"the exponent's {pct} interval [{out['b_lo']:.3g}, {out['b_hi']:.3g}] contains 0"
    elif r2 < r2_floor:
        reason = f"R^2 {r2:.3f} is below the floor {r2_floor:g}"
    else:
        reason = None
    out.update(flat=reason is not None, reason=reason)
    return out


def exponent_interval_from_r2(b: float, r2: float | None, points: int,
                              confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The exponent's t-interval rebuilt from b, R^2 and the point count (for a straight-line least
    squares fit |t| = sqrt(R^2 (n - 2) / (1 - R^2))): summaries written before fits recorded their
    interval still show one. None with fewer than 3 points or no R^2."""
    if r2 is None or points < 3 or not 0.0 <= r2 <= 1.0:
        return None
    if r2 == 1.0:
        return b, b
    if r2 == 0.0:
        return -math.inf, math.inf
    se = abs(b) * math.sqrt((1.0 - r2) / (r2 * (points - 2)))
    half = _t_quantile(points - 2, confidence) * se
    return b - half, b + half


def log_compute_for_loss(a: float, b: float, loss: float) -> float | None:
    """log C with a * C^-b = loss, as (log a - log loss) / b: finite or +-inf, never an overflow
    (the direct (loss / a)^(-1/b) overflows for small b). None when b == 0: a flat law reaches
    ``loss`` at every compute or at none."""
    if b == 0:
        return None
    return (math.log(a) - math.log(loss)) / b


def compute_for_loss(a: float, b: float, loss: float) -> float | None:
    """C with a * C^-b = loss (``math.inf`` past the float range); None when b == 0."""
    log_c = log_compute_for_loss(a, b, loss)
    if log_c is None:
        return None
    return math.inf if log_c > _LOG_FLOAT_MAX else math.exp(log_c)


def compute_penalty(a: float, b: float, loss: float, compute: float) -> float | None:
    """1 - C_equivalent / C: the share of its compute a run gave up to reach ``loss`` (negative: it
    did better than a plain run of the same compute; 0.99: it looks like a run with 1% of it).

    Computed from the log ratio, so it cannot overflow: ``-inf`` when C_equivalent / C is beyond
    the float range, None when b == 0 (no compute answer; callers check ``fit_power_law``'s
    ``flat`` first and report why)."""
    log_c = log_compute_for_loss(a, b, loss)
    if log_c is None:
        return None
    d = log_c - math.log(compute)
    return -math.inf if d > _LOG_FLOAT_MAX else -math.expm1(d)


def steps_to_threshold(steps: Sequence[int], losses: Sequence[float], threshold: float) -> dict:
    """First evaluated step at which ``losses`` is at or below ``threshold``, and the step linearly
    interpolated between that evaluation and the previous one. ``None`` if never reached."""
    for i, (s, v) in enumerate(zip(steps, losses)):
        if v <= threshold:
            if i == 0:
                return {"step": int(s), "interpolated": float(s)}
            s0, v0 = steps[i - 1], losses[i - 1]
            frac = (v0 - threshold) / (v0 - v) if v0 != v else 1.0
            return {"step": int(s), "interpolated": float(s0 + frac * (s - s0))}
    return {"step": None, "interpolated": None}


# ------------------------------------------------------------------------- intervals and verdicts

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def _t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean and two-sided t-interval of the mean over independent runs (seeds). One value gives
    no interval (``lo``/``hi`` None): one run says nothing about run-to-run spread."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n, "sd": None}
    sd = float(v.std(ddof=1))
    half = _t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def diff_interval(a: dict, b: dict, confidence: float = CONFIDENCE) -> dict:
    """Interval of mean(a) - mean(b) from per-seed values ``{seed: value}``.

    Paired (t-interval of the per-seed differences) when both sides ran the same >= 2 seeds: a
    seed fixes model init, data order and the label-noise draw for every method, so the pairing
    removes what the methods share. Otherwise Welch's interval of two independent means."""
    a = {k: float(v) for k, v in a.items() if v is not None and not math.isnan(v)}
    b = {k: float(v) for k, v in b.items() if v is not None and not math.isnan(v)}
    if not a or not b:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "paired": False}
    if set(a) == set(b) and len(a) >= 2:
        r = t_interval([a[k] - b[k] for k in sorted(a)], confidence)
        return {**r, "paired": True}
    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    mean = float(va.mean() - vb.mean())
    n = min(va.size, vb.size)
    if va.size < 2 or vb.size < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n, "paired": False}
    sa, sb = va.var(ddof=1) / va.size, vb.var(ddof=1) / vb.size
    se = math.sqrt(sa + sb)
    if se == 0:
        return {"mean": mean, "lo": mean, "hi": mean, "n": n, "paired": False}
    df = (sa + sb) ** 2 / (sa ** 2 / (va.size - 1) + sb ** 2 / (vb.size - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, df)) * se
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "paired": False}


def verdict(interval: dict) -> str:
    """The claim "difference > 0": ``holds`` when the whole interval is above 0, ``does not hold``
    when it is wholly below 0, ``inconclusive`` when it contains 0 or there is no interval (one
    seed)."""
    lo, hi = interval.get("lo"), interval.get("hi")
    if lo is None or hi is None:
        return INCONCLUSIVE
    if lo > 0:
        return HOLDS
    if hi < 0:
        return FAILS
    return INCONCLUSIVE


def all_of(*verdicts: str) -> str:
    """A claim made of several parts (e.g. Pareto dominance: better on both axes): it holds when
    every part holds, does not hold when any part does not, else inconclusive."""
    if FAILS in verdicts:
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE
