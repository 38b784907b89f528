"""The issue-14 sweep axes and matched-budget comparisons on small synthetic sweeps with known
answers: `sgtm analyze joint-policy` / `retain-fraction`, the tradeoff's plateau and
equal-retain-token rows, and `compute-penalty --from-history`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.sweeps import synthetic_sweep

NOISE = (0.0, 0.02, -0.02)  # per-seed offsets shared by every group (paired differences are exact)


def _history(sweep: Path, per_cell) -> None:
    """Write each cell's metrics.jsonl: ``per_cell(row) -> [(step, {metric: value})]``."""
    data = json.loads((sweep / "results.json").read_text())
    for row in data["cells"]:
        lines = [json.dumps({"kind": "eval", "step": step, **m}) for step, m in per_cell(row)]
        (Path(row["run_dir"]) / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _by_claim(res: dict, text: str) -> dict:
    hits = [c for c in res["claims"] if text in c["claim"]]
    assert len(hits) == 1, [c["claim"] for c in res["claims"]]
    return hits[0]


def test_joint_policy_compares_each_policy_with_non_forget_and_reports(tmp_path):
    """non_forget removes clearly more than `all` (holds) and the same as `embeddings_all`
    (inconclusive); with the losses swapped the first claim does not hold."""
    from pipeline.experiments.analyses.joint_policy import joint_policy
    from pipeline.experiments.report import build_report

    def run(sub: str, forget: dict) -> dict:
        cells = []
        for seed, eps in enumerate(NOISE):
            for policy, f in forget.items():
                jitter = 0.03 * (seed - 1) if policy == "embeddings_all" else 0.0
                cells.append(("sgtm", seed, {"forget": (f + eps + jitter, f), "retain": (4.6 + eps, 4.6)},
                              {"labels": {"joint_policy": policy, "seed": seed}}))
        d = tmp_path / sub
        d.mkdir()
        return joint_policy([str(synthetic_sweep(d, cells))], str(d / "analysis" / "bilingual"), "test")

    res = run("a", {"non_forget": 8.0, "embeddings_all": 8.0, "all": 6.5})
    assert [r["joint_policy"] for r in res["table"]] == ["non_forget", "embeddings_all", "all"]
    assert all(r["seeds"] == 3 for r in res["table"]) and res["table"][2]["forget_cal"] == pytest.approx(6.5)
    assert _by_claim(res, "the one with all (")["holds"] == "holds"
    assert _by_claim(res, "the one with embeddings_all")["holds"] == "inconclusive"
    assert _by_claim(res, "retain loss with non_forget minus with all")["holds"] is None
    assert (tmp_path / "a" / "analysis" / "bilingual" / "joint_policy.png").is_file()
    swapped = run("b", {"non_forget": 6.5, "embeddings_all": 6.5, "all": 8.0})
    assert _by_claim(swapped, "the one with all (")["holds"] == "does not hold"
    # the report renders the section, its claims and its figure from the committed-style summary
    text = build_report([tmp_path / "a" / "analysis"], tmp_path / "docs", command="sgtm report").read_text()
    assert "## Joint-parameter policy (SGTM) [bilingual]" in text and "figures/bilingual_joint_policy.png" in text
    assert (tmp_path / "docs" / "results" / "bilingual_joint_policy.json").is_file()


def test_policy_with_fewer_seeds_is_compared_on_the_seeds_both_ran(tmp_path):
    """`all` ran seed 0 only: its difference from non_forget is taken against non_forget's seed 0
    (8.3 - 7.0), not against non_forget's 3-seed mean (8.0 - 7.0)."""
    from pipeline.experiments.analyses.joint_policy import joint_policy

    cells = [("sgtm", s, {"forget": (f, f), "retain": (4.6, 4.6)},
              {"labels": {"joint_policy": "non_forget", "seed": s}}) for s, f in ((0, 8.3), (1, 7.85), (2, 7.85))]
    cells.append(("sgtm", 0, {"forget": (7.0, 7.0), "retain": (4.5, 4.5)},
                  {"labels": {"joint_policy": "all", "seed": 0}}))
    res = joint_policy([str(synthetic_sweep(tmp_path, cells))], str(tmp_path / "out"), "test")
    c = _by_claim(res, "the one with all (")
    assert c["diff"]["mean"] == pytest.approx(1.3) and c["holds"] == "inconclusive"  # one seed: no interval
    assert res["table"][0]["forget_cal"] == pytest.approx(8.0) and res["table"][0]["seeds"] == 3


def test_joint_policy_needs_labelled_sgtm_cells(tmp_path):
    from pipeline.experiments.analyses.joint_policy import joint_policy

    sweep = synthetic_sweep(tmp_path, [("sgtm", 0, {"forget": (8.0, 8.0), "retain": (4.6, 4.6)})])
    with pytest.raises(ValueError, match="joint-policy: no finished SGTM cell with a 'joint_policy' label"):
        joint_policy([str(sweep)], str(tmp_path / "out"), "test")


def test_retain_fraction_orders_the_axis_and_tests_the_retain_effect(tmp_path):
    """Retain loss falling with the retain fraction: the claim at the ends holds; flat: inconclusive."""
    from pipeline.experiments.analyses.retain_fraction import retain_fraction

    def run(sub: str, slope: float) -> dict:
        cells = []
        for seed, eps in enumerate(NOISE):
            for frac in (1.0, 0.0, 0.25):  # out of order on purpose
                r = 4.8 - slope * frac + eps + 0.01 * seed * frac
                cells.append(("sgtm", seed, {"forget": (8.0 + eps, 8.0), "retain": (r, r)}, {"retain_fraction": frac}))
        d = tmp_path / sub
        d.mkdir()
        return retain_fraction([str(synthetic_sweep(d, cells))], str(d / "out"), "test")

    res = run("a", 0.3)
    assert [r["retain_fraction"] for r in res["table"]] == [0.0, 0.25, 1.0]
    assert res["table"][2]["retain_cal"] == pytest.approx(4.5 + 0.01, abs=1e-9)
    assert _by_claim(res, "more retain-mode data")["holds"] == "holds"
    assert _by_claim(res, "forget loss at retain_fraction 1 minus at 0")["holds"] is None
    assert _by_claim(run("b", 0.0), "more retain-mode data")["holds"] == "inconclusive"


def _tradeoff_cells(filter_forget: float) -> list[tuple]:
    cells = []
    for seed, eps in enumerate(NOISE):
        cells.append(("sgtm", seed, {"forget": (8.0 + eps, 8.0), "retain": (4.7 + eps, 4.7)},
                      {"forget_unlabelled": 30_000}))  # tokens.json: retain tokens 9 * 30000 + 1
        cells.append(("weak_filter", seed, {"forget": (5.4 + eps, 5.4), "retain": (4.3 + eps, 4.3)},
                      {"filter": "weak", "forget_unlabelled": 50_000}))
        cells.append(("weak_filter_equal_retain_tokens", seed,
                      {"forget": (filter_forget + eps, filter_forget), "retain": (4.5 + eps, 4.5)},
                      {"filter": "weak", "forget_unlabelled": 30_000 + seed, "steps": 6}))
    return cells


def test_tradeoff_equal_retain_token_rows_and_plateau_from_histories(tmp_path):
    """The matched filter's forget loss decides the equal-token claim; the replayed token counts
    give the ratio; the English plateau comes from the histories (fall 0.1 of 0.5 since the first
    evaluation: share 0.2; the ablated curve for SGTM, the full one for filters)."""
    from pipeline.experiments.analyses.tradeoff import tradeoff

    def curve(row):
        full = {100: 5.0, 200: 4.6, 300: 4.5}
        abl = {100: 5.4, 200: 4.9, 300: 4.6}  # SGTM's deployed (ablated) curve: fall 0.3 of 0.8
        return [(s, {"retain_full": full[s], "retain_ablated": abl[s], "forget_full": 6.0, "forget_ablated": 7.0})
                for s in (100, 200, 300)]

    def run(sub: str, filter_forget: float) -> dict:
        d = tmp_path / sub
        d.mkdir()
        sweep = synthetic_sweep(d, _tradeoff_cells(filter_forget))
        _history(sweep, curve)
        return tradeoff([str(sweep)], str(d / "out"), "test")

    res = run("a", 5.9)
    c = _by_claim(res, "at equal retain tokens: SGTM's deployed forget loss")
    assert c["holds"] == "holds" and "ratio" in c["here"]
    m = res["setup"]["matched_budget"]
    assert m["sgtm_retain_tokens"] == 9 * 30_000 + 1 and m["seeds"] == 3 and m["filter_steps"] == 6
    assert m["ratio"] == pytest.approx(sum((9 * (30_000 + s) + 1) / (9 * 30_000 + 1) for s in range(3)) / 3)
    assert m["filter_retain_tokens_equal_steps"] == 9 * 50_000 + 1
    r = _by_claim(res, "at equal retain tokens: SGTM's retain loss")
    assert r["holds"] is None and r["diff"]["mean"] == pytest.approx(0.2) and "at equal steps" in r["here"]
    assert res["setup"]["steps"] == 10  # the SGTM cells' steps, not the matched filter's
    p = res["setup"]["plateau"]
    assert (p["interval"], p["first_step"], p["last_step"]) == (100, 100, 300)
    assert p["methods"]["weak_filter"]["retain_last_share"] == pytest.approx(0.2)
    assert p["methods"]["sgtm"]["retain_last_share"] == pytest.approx(0.3 / 0.8)
    assert p["methods"]["sgtm"]["retain_last_drop"] == pytest.approx(0.3)
    assert _by_claim(res, "still falling")["holds"] is None
    # the matched filter forgetting more than SGTM: the claim does not hold
    assert _by_claim(run("b", 8.5), "at equal retain tokens: SGTM's deployed forget")["holds"] == "does not hold"


def test_tradeoff_without_matched_cells_has_no_equal_token_rows(tmp_path):
    from pipeline.experiments.analyses.tradeoff import tradeoff

    cells = [c for c in _tradeoff_cells(5.9) if c[0] != "weak_filter_equal_retain_tokens"]
    res = tradeoff([str(synthetic_sweep(tmp_path, cells))], str(tmp_path / "out"), "test")
    assert "matched_budget" not in res["setup"] and "plateau" not in res["setup"]  # no histories either
    assert not [c for c in res["claims"] if "equal retain tokens" in c["claim"]]


def test_compute_penalty_from_history_scores_runs_on_the_fits_batches(tmp_path):
    """No-filter histories on an exact power law L = a C^-b; an SGTM run whose last training-time
    (ablated) retain loss equals the law at half its compute has penalty 0.5. Its whole-split
    deployed loss (deployed.json) is far off: using it (the old code) gives another penalty."""
    from pipeline.experiments.analyses.compute_penalty import compute_penalty_analysis

    a, b, per_step = 20.0, 0.1, 6.0 * 1000 * 64  # n_params 1000, 64 tokens a step

    def law(c):
        return a * c ** -b

    cells = [("no_filter", s, {"forget": (9.0, 9.0), "retain": (9.0, 9.0)}) for s in range(3)]
    cells += [("sgtm", s, {"forget": (9.0, 9.0), "retain": (9.0, 9.0)}) for s in range(3)]
    sweep = synthetic_sweep(tmp_path, cells)

    def hist(row):
        steps = (100, 200, 300)
        if row["strategy"] == "none":
            return [(s, {"retain_full": law(per_step * s), "forget_full": law(per_step * s)}) for s in steps]
        return [(s, {"retain_full": 1.0, "retain_ablated": law(per_step * s / 2), "forget_full": 1.0,
                     "forget_ablated": law(per_step * s / 10)}) for s in steps]

    _history(sweep, hist)
    res = compute_penalty_analysis([str(sweep)], str(tmp_path / "out"), "test", from_history=True)
    written = json.loads((tmp_path / "out" / "compute_penalty_history.analysis.json").read_text())
    assert written["analysis"] == "compute_penalty_history" and "training histories" in written["title"]
    assert res["fits"]["retain"]["b"] == pytest.approx(b) and res["fits"]["retain"]["points"] == 9
    rows = {(r["set"], r["method"]): r for r in res["table"]}
    assert rows[("retain", "sgtm")]["penalty"] == pytest.approx(0.5) and rows[("retain", "sgtm")]["seeds"] == 3
    assert rows[("forget", "sgtm")]["penalty"] == pytest.approx(0.9)
    assert all(r["compute_flops"] == per_step * 300 for r in res["runs"])


def test_wiki_gap_share_places_each_method_between_no_filter_and_perfect_filter(tmp_path):
    """Per seed, no filter 4.0+eps and the perfect filter 4.5+2eps (gap 0.5+eps): a method at
    no + k * gap closes share k exactly, its forget rise beyond its retain rise (0.1 k) is
    k * gap - 0.1 k, and "removes some forget knowledge" holds only for k > 0 (a method below no
    filter does not hold)."""
    from pipeline.experiments.analyses.tradeoff import tradeoff

    ks = {"sgtm": 0.8, "weak_filter": 0.3, "strict_filter": -0.4}
    cells = []
    for seed, eps in enumerate((0.0, 0.05, -0.03)):
        no, gap = 4.0 + eps, 0.5 + eps
        rows = {"no_filter": no, "perfect_filter": no + gap, **{m: no + k * gap for m, k in ks.items()}}
        for m, f in rows.items():
            r = 3.0 + eps + 0.1 * ks.get(m, 0.0)  # each method's retain rise: 0.1 k
            cells.append((m, seed, {"forget": (f, f), "retain": (r, r)}))
    res = tradeoff([str(synthetic_sweep(tmp_path, cells))], str(tmp_path / "out"), "test")
    shares = res["headroom"]["methods"]
    for m, k in ks.items():
        assert shares[m]["share"] == pytest.approx(k) and shares[m]["seeds"] == 3
        assert shares[m]["lo"] == pytest.approx(k) and shares[m]["hi"] == pytest.approx(k)
        mean_gap = sum(0.5 + e for e in (0.0, 0.05, -0.03)) / 3
        assert shares[m]["beyond_retain"] == pytest.approx(k * mean_gap - 0.1 * k)
    assert shares["perfect_filter"]["share"] == pytest.approx(1.0)
    assert _by_claim(res, "sgtm removes some forget")["holds"] == "holds"
    assert _by_claim(res, "weak filter removes some forget")["holds"] == "holds"
    assert _by_claim(res, "strict filter removes some forget")["holds"] == "does not hold"
    assert "share of the removable gap closed: 0.800" in _by_claim(res, "sgtm removes some forget")["here"]
