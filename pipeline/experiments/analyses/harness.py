"""`sgtm analyze harness`: `sgtm eval-harness` on every finished cell of the sweeps, then accuracy
per method, task and domain over seeds next to the deployed loss: whether a model can still *use*
a domain, which loss alone does not say. The per-cell run and its cache are
:mod:`pipeline.experiments.eval_harness`."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from pipeline.experiments import harness_tasks as ht
from pipeline.experiments.analyses.registry import Analysis, register
from pipeline.experiments.common import coverage_note, finished, method_of, summarize, value, write_analysis
from pipeline.experiments.eval_harness import cell_result
from pipeline.experiments.stats import diff_interval, t_interval, verdict


def _domain_set(role: str, domains: list[str]) -> str:
    """The ``deployed.json`` set name of a task role (its loss goes next to the accuracy)."""
    if role.startswith("forget:"):
        return "forget" if len(domains) == 1 else role
    return role


def harness(sweeps: list[str], out: str, command: str, kinds: list[str] | None = None, seed: int = 0,
            max_items: int = 500, batch_size: int = 32, summary: str | None = None, log=print) -> dict:
    """Every finished cell of the sweeps through `sgtm eval-harness` (one at a time), then per method,
    task and domain the mean accuracy over seeds with its 95% t-interval, next to the deployed loss."""
    kinds = ht.parse_kinds(kinds)
    cells = finished(sweeps, log=log)
    if not cells:
        raise ht.TaskError(f"{', '.join(map(str, sweeps))}: no finished cells to evaluate")
    task_root = Path(out) / "harness_tasks"
    per: dict[tuple[str, str], dict] = defaultdict(dict)  # (method, task) -> {seed: acc}
    meta: dict[tuple[str, str], dict] = {}
    stderr: dict[tuple[str, str], list[float]] = defaultdict(list)
    losses: dict[tuple[str, str], dict] = defaultdict(dict)
    for c in sorted(cells, key=lambda c: (method_of(c), c.get("seed", 0))):
        rec = cell_result(c, task_root, kinds, seed, max_items, batch_size, command, log=log)
        m, s = method_of(c), c.get("seed", 0)
        domains = [r.split(":", 1)[1] for r in {t["role"] for t in rec["tasks"].values()} if r.startswith("forget:")]
        for name, t in rec["tasks"].items():
            per[(m, name)][s] = t["acc"]
            meta[(m, name)] = {"kind": t["kind"], "domain": t["role"], "items": t["items"], "chance": t["chance"],
                               "deployed_model": rec["model"].get("deployed_model")}
            if t.get("acc_stderr") is not None:
                stderr[(m, name)].append(t["acc_stderr"])
            losses[(m, name)][s] = value(c, _domain_set(t["role"], domains), "deployed")
    rows = []
    for (m, name), accs in sorted(per.items(), key=lambda kv: (meta[kv[0]]["kind"], meta[kv[0]]["domain"], kv[0][0])):
        iv, lv = t_interval(list(accs.values())), t_interval(list(losses[(m, name)].values()))
        info = meta[(m, name)]
        se = stderr[(m, name)]
        rows.append({"task": info["kind"], "domain": info["domain"], "method": m, "seeds": iv["n"],
                     "deployed_model": info["deployed_model"], "acc": iv["mean"],
                     "acc_pm": None if iv["lo"] is None else iv["hi"] - iv["mean"],
                     "harness_stderr": sum(se) / len(se) if se else None,
                     "chance": info["chance"], "items": info["items"], "loss": lv["mean"],
                     "loss_pm": None if lv["lo"] is None else lv["hi"] - lv["mean"]})
    claims = []
    for kind in kinds:
        for (m, name), accs in per.items():
            if m != "sgtm" or meta[(m, name)]["kind"] != kind or not meta[(m, name)]["domain"].startswith("forget"):
                continue
            for other in ("weak_filter", "no_filter"):
                if (other, name) not in per:
                    continue
                d = diff_interval(per[(other, name)], accs)
                here = (f"{fmt_iv(d)} ({other} {per_mean(per[(other, name)]):.3f}, sgtm {per_mean(accs):.3f})"
                        if d["mean"] is not None else "-")
                claims.append({"claim": f"{kind} accuracy on {meta[(m, name)]['domain']}: SGTM's deployed model "
                                        f"below {other}'s", "paper": "(accuracy not reported; loss: SGTM forgets more "
                                                                    "than filters at equal retain)",
                               "here": here, "holds": verdict(d), "interval": d})
    payload = {"title": "lm-evaluation-harness accuracy (held-out multiple choice)", "command": command,
               "inputs": [str(s) for s in sweeps],
               "seeds": "/".join(str(n) for n in sorted({r["seeds"] for r in rows})), "table": rows,
               "claims": claims, "setup": {"kinds": kinds, "item_seed": seed, "max_items": max_items,
                                           "choices": ht.CHOICES},
               "notes": [coverage_note(sweeps),
                         "Four-way multiple choice made from held-out documents only (chance 0.25): `cloze` = the "
                         "true next word among three words drawn from the same domain's held-out text; "
                         "`continuation` = a document's opening and its true next 8 words among spans of other "
                         "held-out documents. Scored by lm-evaluation-harness (`acc`) on the deployed model's HF "
                         "export (ablated for SGTM / Gradient Routing / activation masking, full otherwise, no "
                         "calibration bias); `loss` is the same deployed model's held-out loss of that domain "
                         "(`deployed.json`, no bias).",
                         "acc: mean over seeds, acc_pm: half-width of its 95% t-interval; harness_stderr: the "
                         "harness's own standard error of one run's accuracy (items), averaged over seeds. "
                         "Claims: the interval of (other - SGTM) accuracy, paired by seed."]}
    write_analysis(out, "harness", payload)
    if summary:
        from pipeline.components.checkpoint import atomic_write_text

        body = {**summarize(payload | {"analysis": "harness"}), "tag": Path(out).name}
        Path(summary).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(summary), json.dumps(body, indent=1, default=str, allow_nan=False) + "\n")
    return payload


def per_mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def fmt_iv(d: dict) -> str:
    if d["lo"] is None:
        return f"{d['mean']:+.3f} (one seed: no interval)"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweeps", nargs="+", required=True, help="sweep result dirs (OUT/<name>) or results.json "
                                                                   "(the harness needs the cells' checkpoints)")
    parser.add_argument("--out", required=True, help="directory for harness.analysis.json")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="KIND")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-items", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--summary", help="also write the report's summary of the analysis to this file "
                                          "(what `sgtm report` writes as docs/results/<tag>_harness.json)")


def _run(args: argparse.Namespace, command: str) -> dict:
    return harness(args.sweeps, args.out, command, kinds=args.tasks, seed=args.seed, max_items=args.max_items,
                   batch_size=args.batch_size, summary=args.summary)


def _claim_line(c: dict) -> str:
    return f"  {c['claim']}: here {c['here']} -> {c['holds']}"


register(Analysis(
    name="harness", help="eval-harness on every finished cell; mean and 95%% interval per method, task and domain, "
                         "next to the deployed loss",
    run=_run, arguments=_arguments, summaries=("harness",), expected={"bilingual": ("harness",), "wiki": ("harness",)},
    cli_order=140, report_order=20, pending_order=30, claim_line=_claim_line))
