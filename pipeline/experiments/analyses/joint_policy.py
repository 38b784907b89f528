"""`sgtm analyze joint-policy`: SGTM's deployed losses per joint-parameter policy, each against
``non_forget`` on the seeds both ran."""

from __future__ import annotations

from pipeline.experiments.analyses.claims import (
    CAL,
    DEPLOYED_NOTE,
    INTERVAL_NOTE,
    RAW,
    claim,
    compare,
    group_by,
    interval_columns,
    on_common_seeds,
    per_seed_losses,
    seed_note,
    vs_text,
)
from pipeline.experiments.analyses.plots import axis_plot
from pipeline.experiments.analyses.registry import Analysis, on_sweeps, register, sweep_arguments
from pipeline.experiments.common import (
    coverage_note,
    figure,
    finished,
    write_analysis,
)
from pipeline.experiments.stats import (
    CONFIDENCE,
)

POLICY_TEXT = {"non_forget": "neither embeddings nor norms learn from forget tokens",
               "embeddings_all": "embeddings learn from forget tokens, norms do not",
               "norms_all": "norms learn from forget tokens, embeddings do not",
               "all": "embeddings and norms learn from forget tokens"}


def joint_policy(sweeps: list[str], out: str, command: str) -> dict:
    """SGTM's deployed forget / retain loss per joint-parameter policy (the ``joint_policy`` label
    of configs/sweeps/joint_policy.yaml), each policy against ``non_forget`` (paired by seed)."""
    cells = [c for c in finished(sweeps) if "joint_policy" in c["labels"] and c["strategy"] == "sgtm"]
    if not cells:
        raise ValueError("joint-policy: no finished SGTM cell with a 'joint_policy' label in " + ", ".join(sweeps))
    groups = group_by(cells, lambda c: c["labels"]["joint_policy"])
    order = [p for p in POLICY_TEXT if p in groups] + sorted(p for p in groups if p not in POLICY_TEXT)
    rows = [interval_columns({"joint_policy": p, "seeds": len(groups[p]),
                               "what": POLICY_TEXT.get(p, p)}, groups[p], sets=("forget", "retain"))
            for p in order]
    fig, axes = figure(2)
    axis_plot(axes, order, groups, "joint-parameter policy", categorical=True)
    vals = per_seed_losses(groups, order)
    claims = []
    if "non_forget" in vals:
        ref = vals["non_forget"]
        for p in order:
            if p == "non_forget":
                continue
            r, q = on_common_seeds(ref, vals[p])
            iv, v = compare(r["forget"][CAL], q["forget"][CAL])
            claims.append(claim(f"masking joint parameters for forget tokens removes more: SGTM's deployed forget "
                                f"loss with non_forget is above the one with {p} ({POLICY_TEXT.get(p, p)})",
                                "a config choice in the paper (embeddings learn jointly on TinyStories, masked on "
                                "Wikipedia); no comparison reported",
                                "non_forget vs " + p + ": " + vs_text(r["forget"][CAL], q["forget"][CAL]),
                                v, diff=iv, holds_uncalibrated=compare(r["forget"][RAW], q["forget"][RAW])[1]))
            ivr, _ = compare(r["retain"][CAL], q["retain"][CAL])
            claims.append(claim(f"retain loss with non_forget minus with {p} (what masking costs English)",
                                "-", "non_forget vs " + p + ": " + vs_text(r["retain"][CAL], q["retain"][CAL]),
                                None, diff=ivr))
    payload = {"title": "Joint-parameter policy (SGTM)", "command": command, "inputs": [str(s) for s in sweeps],
               "seeds": seed_note(groups), "table": rows, "claims": claims,
               "setup": {"undiscovered_rate": cells[0]["undiscovered_rate"], "steps": cells[0]["steps"],
                         "retain_fraction": cells[0].get("retain_fraction"), "confidence": CONFIDENCE},
               "notes": [coverage_note(sweeps),
                         "Policies: non_forget = sgtm.joint_update=non_forget (embeddings follow it); embeddings_all "
                         "= sgtm.embedding_update=all; all = sgtm.joint_update=all (embeddings follow it). Norms "
                         "include the final norm; the LM head is tied to the token embedding. Claims compare a "
                         "policy with non_forget on the seeds both ran (paired).",
                         DEPLOYED_NOTE, INTERVAL_NOTE]}
    write_analysis(out, "joint_policy", payload, fig)
    return payload


register(Analysis(
    name="joint-policy", help="SGTM's deployed losses per joint-parameter policy (embeddings/norms updated by "
                              "forget tokens or not)",
    run=on_sweeps(joint_policy), arguments=sweep_arguments, summaries=("joint_policy",),
    expected={"bilingual": ("joint_policy",)}, cli_order=80, report_order=70, pending_order=90))
