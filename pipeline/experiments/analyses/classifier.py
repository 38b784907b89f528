"""`sgtm analyze classifier`: precision / recall of the forget tags that reached training."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    write_analysis,
)


def classifier(sweeps: list[str], out: str, command: str) -> dict:
    """Precision/recall of the tags that reached training (classifier or simulated), per sweep base."""
    import yaml

    from pipeline.config import load_config
    from pipeline.data.loader import tagging_report

    rows, seen = [], set()
    for s in sweeps:
        data = json.loads((Path(s) / "results.json" if Path(s).is_dir() else Path(s)).read_text())
        base = Path(data["base"])
        cfg = load_config(data=yaml.safe_load(base.read_text()))
        key = json.dumps(cfg.data.to_dict(), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        conf = tagging_report(cfg.data).to_dict()
        dom = f"forget:{cfg.data.domains[0]}"
        tp = conf.get(dom, {}).get(dom, {}).get("tokens", 0)
        true_f = sum(v["tokens"] for v in conf.get(dom, {}).values())
        tagged_f = sum(row.get(dom, {}).get("tokens", 0) for row in conf.values())
        rows.append({"sweep": data["sweep"], "tagging": cfg.data.tagging.source,
                     "recall_tokens": tp / true_f if true_f else None,
                     "precision_tokens": tp / tagged_f if tagged_f else None,
                     "undiscovered_tokens_share": 1 - tp / true_f if true_f else None,
                     "forget_share_of_train_tokens": true_f / max(1, sum(v["tokens"] for r in conf.values()
                                                                        for v in r.values())),
                     "confusion": conf})
    payload = {"title": "Tagging quality (train split)", "command": command, "inputs": [str(s) for s in sweeps],
               "table": [{k: v for k, v in r.items() if k != "confusion"} for r in rows], "details": rows,
               "claims": []}
    write_analysis(out, "classifier", payload, None)
    return payload


register(Analysis(
    name="classifier", help="precision/recall of the tags that reached training", run=on_sweeps(classifier),
    arguments=sweep_arguments, summaries=("classifier",), expected={"wiki": ("classifier",)},
    cli_order=60, report_order=110, pending_order=20))
