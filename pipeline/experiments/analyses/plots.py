"""Shared matplotlib helpers of the analyses: method colours, one error bar, the per-axis-value
plot of the joint-policy and retain-fraction axes. (``figure`` and writing the PNG stay in
:mod:`pipeline.experiments.common`, which the attack and RMU commands use too.)"""

from __future__ import annotations

from typing import Any

from pipeline.experiments.analyses.claims import CAL
from pipeline.experiments.common import per_seed, value
from pipeline.experiments.stats import t_interval
from pipeline.sgtm.methods import COLOURS

COLORS = COLOURS  # each method's colour, from the method registry (pipeline/sgtm/methods.py)


def errorbar(ax: Any, x: float, cells_fn: dict[int, float], **kw: Any) -> dict:
    """One point at ``x``: the mean of the per-seed values with its 95% t-interval as the bar (none
    for one seed); returns the interval."""
    iv = t_interval(list(cells_fn.values()))
    if iv["mean"] is None:
        return iv
    err = None if iv["lo"] is None else [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]
    ax.errorbar([x], [iv["mean"]], yerr=err, fmt="o", capsize=3, **kw)
    return iv


def axis_plot(axes: list, xs: list, groups: dict, label: str, categorical: bool) -> None:
    """Deployed forget / retain loss (calibrated) per axis value with 95% error bars and the
    per-seed values as dots."""
    for ax, s in zip(axes, ("forget", "retain")):
        pts = []
        for i, x in enumerate(xs):
            vals = per_seed(groups[x], lambda c, s=s: value(c, s, CAL))
            pos = i if categorical else x
            iv = errorbar(ax, pos, vals, color="tab:red")
            ax.plot([pos] * len(vals), list(vals.values()), ".", color="k", alpha=0.4)
            pts.append((pos, iv["mean"]))
        if not categorical:
            ax.plot([p for p, _ in pts], [m for _, m in pts], "-", color="tab:red", alpha=0.5)
        if categorical:
            ax.set_xticks(range(len(xs)), [f"{x}\n({len(groups[x])} seeds)" for x in xs], fontsize=8)
        else:
            for x in xs:
                ax.annotate(f"{len(groups[x])}", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                            textcoords="offset points", ha="center", fontsize=7, color="gray")
        ax.set(title=f"SGTM deployed {s} loss (calibrated; 95% intervals, dots: seeds)",
               xlabel=label + ("" if categorical else " (gray: seeds)"),
               ylabel="nats/token" + (" (higher = more removed)" if s == "forget" else ""))
        ax.grid(alpha=0.3)
