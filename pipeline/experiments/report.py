"""`sgtm report --runs DIR... --out DIR`: gather every ``*.analysis.json`` (and its PNG) under the
given directories, write a small summary of each to ``OUT/results/<tag>_<name>.json`` (committed:
the numbers a reader can check without rerunning anything), and render the Markdown report from
those summaries only, each number next to the command that produced it.

The intro (``--intro``) is a template: ``{{tag/name:path|format}}`` fields are filled from the
summaries (``path``: dotted keys and list indices, ``table[key=value]`` picks a row, e.g.
``{{bilingual/tradeoff:table[method=sgtm].forget_cal|.3f}}``); a field whose analysis was not
regenerated renders as "(pending)", so prose never shows a number the summaries do not hold.
``--readme FILE`` replaces the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in FILE with the claims table rendered from the same summaries.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.experiments.analyses import registry
from pipeline.experiments.common import SKIP_COLUMNS, fmt, summarize
from pipeline.experiments.stats import CONFIDENCE, POWER_LAW_R2_FLOOR, exponent_interval_from_r2

VERDICT = {None: "compare", True: "holds", False: "does not hold"}
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
FIELD = re.compile(r"\{\{([\w-]+)/([\w-]+):([^}|]+)(?:\|([^}]*))?\}\}")


def verdict_text(v: Any) -> str:
    return v if isinstance(v, str) else VERDICT[v]


def _order(summary: dict) -> tuple:
    """A summary's place in the report: the registry's section order (analyses/registry.py)."""
    name = summary.get("analysis", "")
    order = registry.report_order()
    for i, prefix in enumerate(order):
        if name.startswith(prefix):
            return (i, name)
    return (len(order), name)


def write_summaries(runs: list[str | Path], summary_dir: Path) -> dict[str, dict]:
    """``<tag>_<name>.json`` for every analysis under ``runs`` (tag: the analysis directory's name);
    summaries of analyses not found are removed, so the directory holds one regeneration."""
    files = sorted({p.resolve() for r in runs for p in Path(r).rglob("*.analysis.json")})
    summaries = {}
    for f in files:
        a = json.loads(f.read_text())
        if a["analysis"].startswith("attack_") or a["analysis"] == "rmu":
            continue  # one attack / RMU run each: the inputs the `attacks` analysis summarises
        key = f"{f.parent.name}/{a['analysis']}"
        s = summarize(a)
        s["tag"] = f.parent.name
        s["png"] = a.get("png")
        s["_dir"] = str(f.parent)
        summaries[key] = s
    summary_dir.mkdir(parents=True, exist_ok=True)
    for old in summary_dir.glob("*.json"):
        old.unlink()
    for key, s in summaries.items():
        path = summary_dir / (key.replace("/", "_") + ".json")
        body = {k: v for k, v in s.items() if not k.startswith("_") and k != "png"}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=1, default=str, allow_nan=False) + "\n")
        tmp.replace(path)
    return summaries


def load_summaries(summary_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(Path(summary_dir).glob("*.json")):
        s = json.loads(f.read_text())
        if "analysis" in s and "tag" in s:
            out[f"{s['tag']}/{s['analysis']}"] = s
    return out


def _resolve(obj: Any, path: str) -> Any:
    for part in re.findall(r"[^.\[\]]+(?:\[[^\]]*\])?", path):
        m = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", part)
        key, sel = m.group(1), m.group(2)
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
        if sel is not None:
            if "=" in sel:
                conds = [c.split("=", 1) for c in sel.split(",")]
                hits = [r for r in obj if all(str(r.get(k)) == v for k, v in conds)]
                if len(hits) != 1:
                    raise KeyError(f"[{sel}] matches {len(hits)} rows")
                obj = hits[0]
            else:
                obj = obj[int(sel)]
    return obj


def render_template(text: str, summaries: dict[str, dict]) -> str:
    """Fill ``{{tag/name:path|format}}`` fields; format: a Python format spec (``.3f``), ``pct``
    (x100, no decimals, with %), ``pct1`` (one decimal) or nothing (as stored)."""

    def sub(m: re.Match) -> str:
        key, path, spec = f"{m.group(1)}/{m.group(2)}", m.group(3), m.group(4) or ""
        if key not in summaries:
            return "(pending)"
        try:
            v = _resolve(summaries[key], path)
        except (KeyError, IndexError, TypeError, ValueError):
            return "(pending)"
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "(pending)"
        if spec == "pct":
            return f"{100 * v:.0f}%"
        if spec == "pct1":
            return f"{100 * v:.1f}%"
        return format(v, spec) if spec else str(v)

    return FIELD.sub(sub, text)


def _table(rows: list[dict], limit: int = 40) -> str:
    if not rows:
        return ""
    cols = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and k not in SKIP_COLUMNS and not isinstance(v, (dict, list)):
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows[:limit]:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in the summary)")
    return "\n".join(lines)


def fit_text(name: str, fit: dict) -> str:
    """One power-law fit for the report: a, b with its interval, R^2, points, and "no penalty: the
    fit is flat" when it is. Summaries written before fits carried an interval (no ``b_lo`` key)
    get one rebuilt from b, R^2 and the point count, marked as such, so old and new summaries
    render alike."""
    text = f"{name}: a={fmt(fit['a'])}, b={fmt(fit['b'], 4)}"
    derived = "b_lo" not in fit
    if derived:
        iv = exponent_interval_from_r2(fit["b"], fit.get("r2"), fit.get("points", 0))
    else:
        iv = None if fit["b_lo"] is None else (fit["b_lo"], fit["b_hi"])
    conf = f"{100 * fit.get('confidence', CONFIDENCE):g}%"
    if iv is not None:
        text += f" [{fmt(iv[0], 4)}, {fmt(iv[1], 4)}] ({conf}{', from R^2 and n' if derived else ''})"
    text += f", R^2={fmt(fit.get('r2'))} ({fit['points']} runs)"
    if derived:
        floor = POWER_LAW_R2_FLOOR
        r2 = fit.get("r2")
        flat = iv is None or iv[0] <= 0.0 <= iv[1] or r2 is None or r2 < floor
        reason = "no interval or R^2" if iv is None or r2 is None else (
            f"the exponent's {conf} interval contains 0" if iv[0] <= 0.0 <= iv[1] else f"R^2 below the floor {floor:g}")
    else:
        flat, reason = fit.get("flat", False), fit.get("reason")
    return text + (f": no penalty: the fit is flat ({reason})" if flat else "")


def _claim_row(c: dict, analysis: str = "") -> str:
    raw = c.get("holds_uncalibrated", "")
    raw = verdict_text(raw) if raw != "" else ""
    first = f"| {analysis} " if analysis else ""
    return f"{first}| {c['claim']} | {c['paper']} | {c['here']} | {verdict_text(c.get('holds'))} | {raw} |"


CLAIMS_HEADER = ["| claim | paper | here (mean [interval] over seeds) | verdict | verdict without bias |",
                 "| --- | --- | --- | --- | --- |"]


def claims_table(summaries: dict[str, dict], with_analysis: bool = True) -> str:
    lines = (["| analysis " + CLAIMS_HEADER[0], "| --- " + CLAIMS_HEADER[1]] if with_analysis
             else list(CLAIMS_HEADER))
    for _key, s in sorted(summaries.items(), key=lambda kv: _order(kv[1])):
        for c in s.get("claims", []):
            lines.append(_claim_row(c, f"{s['title']} [{s['tag']}]" if with_analysis else ""))
    return "\n".join(lines)


def build_report(runs: list[str | Path], out: str | Path, title: str = "SGTM results", intro: str | None = None,
                 name: str = "results.md", command: str = "", readme: str | Path | None = None) -> Path:
    out = Path(out)
    figs = out / "figures"
    summaries = write_summaries([r for r in runs if Path(r).exists()], out / "results")
    if figs.is_dir():  # figures of analyses not in this report would be stale
        for old in figs.glob("*.png"):
            old.unlink()
    parts = [f"# {title}", ""]
    if command:
        parts += [f"Generated by `{command}`; every number below is in a summary under `{out.name}/results/` "
                  "(one JSON per analysis, committed).", ""]
    if intro:
        parts += [render_template(Path(intro).read_text().rstrip(), summaries), ""]
    # the analyses tools/reproduce_results.sh produces (the registry's expected summaries); a missing one is pending
    pending = [f"{tag}/{a}" for tag, names in registry.expected().items() for a in names
               if f"{tag}/{a}" not in summaries]
    if pending:
        parts += ["## Pending", "",
                  "Not regenerated with the current code in the session that wrote this report (CPU time went to "
                  "the headline cells first; `tools/reproduce_results.sh` produces them). No older numbers are "
                  "shown for them: " + ", ".join(f"`{p}`" for p in pending) + ".", ""]
    if any(s.get("claims") for s in summaries.values()):
        parts += ["## Paper claims at a glance", "", claims_table(summaries), ""]
    sections = []
    for key, s in sorted(summaries.items(), key=lambda kv: _order(kv[1])):
        heading = f"{s.get('title', s['analysis'])} [{s['tag']}]"
        sec = [f"## {heading}", "", "```bash", s.get("command", "(command not recorded)"), "```", ""]
        if s.get("seeds"):
            sec += [f"Seeds per cell: {s['seeds']}.", ""]
        if s.get("claims"):
            sec += ["\n".join(CLAIMS_HEADER + [_claim_row(c) for c in s["claims"]]), ""]
        if s.get("png"):
            figs.mkdir(parents=True, exist_ok=True)
            target = figs / f"{s['tag']}_{s['png']}"
            shutil.copyfile(Path(s["_dir"]) / s["png"], target)
            sec += [f"![{heading}](figures/{target.name})", ""]
        if s.get("fits"):
            sec += ["Fits (loss = a * C^-b): " + "; ".join(fit_text(k, v) for k, v in s["fits"].items()), ""]
        if s.get("table"):
            sec += [_table(s["table"]), ""]
        for note in s.get("notes", []):
            if note:
                sec += [f"*{note}*", ""]
        sec += [f"Summary: `{out.name}/results/{key.replace('/', '_')}.json`", ""]
        sections.append("\n".join(sec))
    text = "\n".join(parts) + "\n" + "\n".join(sections)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(target)
    if readme is not None:
        update_readme(Path(readme), summaries)
    return target


def update_readme(readme: Path, summaries: dict[str, dict]) -> None:
    """Replace the README's results block with the claims table (same summaries as the report)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no '{README_BEGIN}' ... '{README_END}' block to fill")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = claims_table(summaries)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")
    tmp.replace(readme)
