"""The config layer: fragment composition, overrides (list indices too) and sweeps share one
OmegaConf-based implementation; deep merges change exactly what they name; errors are one line
that starts with the key; pipeline.config imports nothing from the sgtm or data packages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import (
    ConfigError,
    ModelConfig,
    SGTMConfig,
    assign_domains,
    compose,
    from_dict,
    load_config,
    merge,
    to_dict,
)
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
# Section fragments (what `section: {base: FILE}` may name) and whole experiments (sweep bases too).
FRAGMENTS = [("model", p) for p in sorted((CONFIGS / "models").glob("*.yaml"))] + [
    ("data", p) for p in sorted((CONFIGS / "data").glob("*.yaml")) if not p.stem.endswith("_labels")]
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml")) + sorted((CONFIGS / "sweeps").glob("*_base.yaml"))
SWEEPS = [p for p in sorted((CONFIGS / "sweeps").glob("*.yaml")) if "grid" in (yaml.safe_load(p.read_text()) or {})]


def flatten(value: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Every leaf by its key path (list positions are ints); empty containers are leaves."""
    if isinstance(value, dict) and value:
        return {k: v for name, sub in value.items() for k, v in flatten(sub, (*prefix, name)).items()}
    if isinstance(value, list) and value:
        return {k: v for i, sub in enumerate(value) for k, v in flatten(sub, (*prefix, i)).items()}
    return {prefix: value}


def other_value(old: Any, draw) -> Any:
    """A value of the same kind as ``old`` that differs from it and reads back from YAML as itself."""
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return old + draw(st.integers(1, 10_000))
    if isinstance(old, float):
        return draw(st.integers(0, 10**6).map(lambda i: i / 1000 + 0.0005).filter(lambda x: x != old))
    if isinstance(old, str):
        return draw(st.from_regex(r"[a-z][a-z0-9_/]{0,12}", fullmatch=True).filter(
            lambda s: s != old and yaml.safe_load(s) == s))
    return draw(st.integers(0, 100))


def word(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    assert yaml.safe_load(text) == value, text
    return text


def nest(path: tuple, value: Any) -> dict:
    for name in reversed(path):
        value = {name: value}
    return value


CASES = [(section, path) for section, path in FRAGMENTS] + [(None, path) for path in EXPERIMENTS]


def _compose(section: str | None, path: Path, overrides: list[str] | None = None, extra: dict | None = None) -> dict:
    if section is None:
        return compose(path, overrides)
    return compose(data={section: {"base": str(path), **(extra or {})}}, overrides=overrides)


@pytest.mark.parametrize("section, path", CASES, ids=[f"{p.parent.name}/{p.stem}" for _, p in CASES])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_fragment_with_a_nested_override_changes_that_key_and_nothing_else(section, path, data):
    """For every fragment under configs/ (models, data, experiments, sweep bases) and any leaf in
    it (nested mappings, list elements): a `key.path=value` override, and for mapping paths the same
    change written as `section: {base: FRAGMENT, ...}`, change that leaf and leave every other one."""
    before = flatten(_compose(section, path))
    leaf = data.draw(st.sampled_from(sorted(before, key=str)), label="leaf")
    new = other_value(before[leaf], data.draw)
    override = ".".join(map(str, leaf)) + "=" + word(new)
    expected = {**before, leaf: new}
    assert flatten(_compose(section, path, [override])) == expected, override
    if section is not None and not any(isinstance(t, int) for t in leaf):
        inner = nest(leaf[1:], new)
        assert flatten(_compose(section, path, extra=inner)) == expected, inner


def test_wiki_tagging_partial_section_keeps_the_fragment_s_other_keys():
    """Regression: `data: {base: wiki.yaml, tagging: {forget_threshold: 0.7}}` used to replace the
    whole tagging section (source classifier -> simulated, retain_fraction 0.1 -> 0.25)."""
    plain = load_config(data={"data": {"base": "data/wiki.yaml"}, "sgtm": {"domains": [{"name": "biology"}]}})
    cfg = load_config(data={"data": {"base": "data/wiki.yaml", "tagging": {"forget_threshold": 0.7}},
                            "sgtm": {"domains": [{"name": "biology"}]}})
    t = cfg.data.tagging
    assert (t.source, t.retain_fraction, t.forget_threshold) == ("classifier", 0.1, 0.7)
    assert to_dict(cfg) == {**to_dict(plain), "data": {**to_dict(plain.data), "tagging": {
        **to_dict(plain.data.tagging), "forget_threshold": 0.7}}}


def test_list_index_overrides_change_one_element():
    path = CONFIGS / "experiments/core_tiny.yaml"
    base = to_dict(load_config(path))
    for override in ("sgtm.domains.0.heads=2", "sgtm.domains[0].heads=2"):
        cfg = to_dict(load_config(path, [override]))
        assert cfg["sgtm"]["domains"][0]["heads"] == 2
        cfg["sgtm"]["domains"][0]["heads"] = 1
        assert cfg == base, override
    # A list that no file wrote starts from the dataclass default (one domain named 'forget').
    cfg = load_config(None, ["sgtm.domains.0.heads=2", "sgtm.domains.0.units=[3, 5]"])
    assert [(d.name, d.heads, d.units) for d in cfg.sgtm.domains] == [("forget", 2, [3, 5])]
    cfg = load_config(CONFIGS / "experiments/bilingual_tiny.yaml",
                      ["data.sources.1.weight=3", "optimizer.betas.1=0.99"])
    assert [s.weight for s in cfg.data.sources] == [1.0, 3.0] and cfg.optimizer.betas == (0.9, 0.99)


def test_mapping_overrides_merge_and_fragment_overrides_replace():
    path = CONFIGS / "experiments/launch_tiny.yaml"  # eval.calibration: {steps: 5, batches: 1}
    cfg = load_config(path, ["eval.calibration={steps: 10}"])
    assert (cfg.eval.calibration.steps, cfg.eval.calibration.batches) == (10, 1)
    # A fragment names a whole section: the file's own model keys (n_layers: 2) do not leak in.
    cfg = load_config(path, ["model=models/wiki-34m.yaml"])
    assert to_dict(cfg.model) == to_dict(load_config(data={"model": "models/wiki-34m.yaml"}).model)


def test_interpolation_and_required_values(tmp_path):
    frag = tmp_path / "model.yaml"
    frag.write_text("n_layers: ???\nd_model: 64\nn_heads: 4\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\nrun_dir: runs/${name}-s${train.seed}\nmodel: {base: model.yaml}\ntrain: {seed: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(exp)
    assert str(info.value).startswith("model.n_layers: Missing mandatory value"), info.value
    cfg = load_config(exp, ["model.n_layers=2"])
    assert cfg.run_dir == "runs/x-s3" and cfg.model.n_layers == 2


@pytest.mark.parametrize("overrides, key, words", [
    (["sgtm.domains.1.heads=2"], "sgtm.domains[1]", "index out of range"),
    (["sgtm.domains.x=1"], "sgtm.domains.x", "is a list"),
    (["sgtm.domains.0.hedas=1"], "sgtm.domains[0].hedas", "unknown key"),
    (["sgtm.domains.0.heads=many"], "sgtm.domains[0].heads", "expected int or list"),
    (["model.n_layers.x=1"], "model.n_layers", "cannot override inside"),
    (["model.n_layers=2.5"], "model.n_layers", "expected an integer"),
    (["engine.precision=fp8"], "engine.precision", "expected one of"),
    (["data.tagging.source=oracle"], "data.tagging.source", "expected one of"),
    (["model=models/nope.yaml"], "model", "not found"),
    (["name=${nowhere}"], "name", "not found"),
    (["a..b=1"], "a..b", "expected a key path"),
    (["sgtm.domains.0.heads=99"], "sgtm.domains[0].heads", "forget heads"),
    (["sgtm={domains: {name: x}}"], "sgtm.domains", "expected a list"),  # a mapping merged over a list
])
def test_errors_are_one_line_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "experiments/bilingual_tiny.yaml", overrides)
    msg = str(info.value)
    assert msg.startswith(key + ":") and words in msg and "\n" not in msg, msg


def test_fragment_cycles_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nn_layers: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "exp.yaml").write_text("model: {base: a.yaml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "exp.yaml")
    assert str(info.value) == "model.base: fragment cycle exp.yaml -> a.yaml -> b.yaml -> a.yaml", info.value


plain = st.recursive(st.one_of(st.integers(), st.booleans(), st.none(), st.text(max_size=3)),
                     lambda inner: st.one_of(st.lists(inner, max_size=2),
                                             st.dictionaries(st.sampled_from("abc"), inner, max_size=3)),
                     max_leaves=8)
mappings = st.dictionaries(st.sampled_from("abcd"), plain, max_size=4)


@settings(max_examples=50, deadline=None)
@given(mappings, mappings)
def test_merge_is_deep_for_mappings_and_replaces_everything_else(a, b):
    out = merge(a, b)
    for k in set(a) | set(b):
        if k not in b:
            assert out[k] == a[k]
        elif isinstance(a.get(k), dict) and isinstance(b[k], dict):
            assert out[k] == merge(a[k], b[k])
        else:
            assert out[k] == b[k]


def test_every_committed_sweep_cell_composes_and_validates(tmp_path, monkeypatch):
    """`sgtm sweep` builds its base and its cells with the same composition as `train`: every cell
    of every sweep under configs/sweeps loads, and distinct cells get distinct keys."""
    from pipeline.experiments import sweep

    fake = {"bilingual": {"sources": [{"path": "en", "true_label": "retain"},
                                      {"path": "es", "true_label": "forget:spanish"}],
                          "domains": ["spanish"], "tokenizer": "bpe.json", "filter": "none",
                          "tagging": {"source": "simulated", "undiscovered_rate": 0.2, "retain_fraction": 0.25}},
            "wiki": {"sources": [{"path": "wiki", "tags": "wiki_tags"}], "domains": ["biology"],
                     "tokenizer": "bpe.json", "filter": "none",
                     "tagging": {"source": "classifier", "retain_fraction": 0.1}}}
    monkeypatch.setattr(sweep, "prepare_data", lambda spec, out: fake[spec["data"]["prepare"]])
    assert len(SWEEPS) >= 5
    for path in SWEEPS:
        spec = sweep.load_sweep(path)
        base = sweep.write_base(spec, tmp_path)
        cells = sweep.resolve(sweep.expand(spec), base, tmp_path)
        assert len({c.key for c in cells}) == len(cells), path.name
        written = yaml.safe_load(base.read_text())["data"]
        kind = spec["data"]["prepare"]
        assert written["tagging"]["source"] == fake[kind]["tagging"]["source"]
        assert written["sources"] == fake[kind]["sources"]


def test_config_imports_nothing_from_the_sgtm_or_data_packages():
    """The layering: pipeline.config is the bottom; sgtm and data import it, never the reverse
    (loading and validating a full experiment included)."""
    code = ("import sys; from pipeline.config import load_config; "
            "load_config('configs/experiments/bilingual_tiny.yaml', ['sgtm.domains.0.heads=2']); "
            "print(sorted(m for m in sys.modules if m.startswith(('pipeline.sgtm', 'pipeline.data'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


@st.composite
def partitions(draw):
    n_heads = draw(st.sampled_from([2, 4, 8]))
    d_ff = draw(st.sampled_from([8, 16, 32]))
    model = ModelConfig(n_layers=draw(st.integers(1, 3)), d_model=8 * n_heads, n_heads=n_heads, d_ff=d_ff,
                        vocab_size=64, max_seq_len=8)
    domain = st.fixed_dictionaries({
        "name": st.sampled_from(["a", "b", "c", ""]),
        "heads": st.one_of(st.integers(-1, n_heads), st.lists(st.integers(-1, n_heads), max_size=3)),
        "units": st.one_of(st.integers(-1, d_ff), st.lists(st.integers(-1, d_ff), max_size=4)),
        "layers": st.one_of(st.none(), st.lists(st.integers(-1, 3), max_size=3)),
    })
    sgtm = from_dict(SGTMConfig, {"domains": draw(st.lists(domain, min_size=1, max_size=3)),
                                  "scope": draw(st.sampled_from(["attention_mlp", "attention", "mlp"]))}, "sgtm")
    return model, sgtm


@settings(max_examples=150, deadline=None)
@given(partitions())
def test_config_placement_of_domains_matches_the_forget_partition(case):
    """Validation places the domains without the model code (assign_domains) and the partition the
    engine builds fills its class tables from that placement: every head and unit of every block
    is where the placement says, and both refuse the same configs with the same line."""
    from pipeline.sgtm.partition import ForgetPartition

    model, sgtm = case
    try:
        placed = assign_domains(model, sgtm)
    except ConfigError as exc:
        with pytest.raises(ConfigError) as info:
            ForgetPartition(model, sgtm, 1)
        assert str(info.value) == str(exc)
        return
    part = ForgetPartition(model, sgtm, 1)
    for d, a in enumerate(placed):
        for layer in range(model.n_layers):
            on = layer in a.layers
            assert part.heads(layer, d) == (a.heads if on else []) and part.units(layer, d) == (a.units if on else [])



# --------------------------------------------------------------------------------------------
# No silent no-ops: a key that a combination would ignore is refused (one line naming it), or
# the combination does what it says.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key, words", [
    (["sgtm.scope=mlp", "sgtm.domains.0.heads=2"], "sgtm.domains[0].heads", "sgtm.scope is 'mlp'"),
    (["sgtm.scope=mlp", "sgtm.domains.0.heads=[3]"], "sgtm.domains[0].heads", "no forget heads"),
    (["sgtm.scope=attention", "sgtm.domains.0.units=8"], "sgtm.domains[0].units", "sgtm.scope is 'attention'"),
    (["sgtm.scope=attention", "sgtm.domains.0.units=[1, 2]"], "sgtm.domains[0].units", "no forget units"),
    (["model.moe_top_k=4"], "model.moe_top_k", "n_experts is 0 (dense)"),
    (["model.moe_capacity_factor=1.0"], "model.moe_capacity_factor", "n_experts is 0 (dense)"),
    (["model.moe_shared_experts=1"], "model.moe_shared_experts", "n_experts is 0 (dense)"),
    (["model.moe_drop_policy=position"], "model.moe_drop_policy", "n_experts is 0 (dense)"),
    (["model.moe_aux_loss_coef=0.1"], "model.moe_aux_loss_coef", "n_experts is 0 (dense)"),
    (["sgtm.moe_forget_routing=own_first"], "sgtm.moe_forget_routing", "n_experts is 0 (dense)"),
    (["model.rope_theta=500000.0"], "model.rope_theta", "positions is 'learned'"),
    (["data.tagging.source=classifier", "data.sources.0.tags=t", "data.sources.1.tags=t"],
     "data.tagging.undiscovered_rate", "only the simulated source draws label noise"),
])
def test_keys_a_combination_would_ignore_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "experiments/bilingual_tiny.yaml", overrides)
    msg = str(info.value)
    assert msg.startswith(key + ":") and words in msg and "\n" not in msg, msg


def test_scope_accepts_a_dropped_key_left_at_zero_or_its_default():
    exp = CONFIGS / "experiments/bilingual_tiny.yaml"
    assert load_config(exp, ["sgtm.scope=mlp"]).sgtm.domains[0].heads == 1  # the default: nothing was asked
    for scope, key, value in (("mlp", "heads", 0), ("mlp", "heads", "[]"), ("attention", "units", 0)):
        cfg = load_config(exp, [f"sgtm.scope={scope}", f"sgtm.domains.0.{key}={value}"])
        (placed,) = assign_domains(cfg.model, cfg.sgtm)
        assert getattr(placed, key) == []
    model = load_config(exp, ["model.arch=llama", "model.positions=rope", "model.rope_theta=500000.0"]).model
    assert model.rope_theta == 500000.0


def test_document_masking_false_lets_attention_cross_documents_and_modes_still_mask(single_process_world):
    """model.document_masking=false is honoured: a position reads the previous document of its
    packed row (true: it does not); forget positions stay unreadable to non-forget ones either way."""
    import torch

    from pipeline.codes import Mode
    from pipeline.engine.engine import build_model
    from tests.support.configs import SEQ, VOCAB, tiny_config

    half = SEQ // 2
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 1:half] = (other[0, 1:half] + 1) % VOCAB  # the first document's content changes
    doc_ids = torch.zeros(1, SEQ, dtype=torch.long)
    doc_ids[:, half:] = 1

    def second_doc_moves(document_masking: bool, first_mode: int) -> bool:
        cfg = tiny_config("gpt-neo", "sgtm", model={"document_masking": document_masking})
        _, model = build_model(cfg, single_process_world)
        modes = torch.full((1, SEQ), Mode.RETAIN, dtype=torch.long)
        modes[:, :half] = first_mode
        with torch.no_grad():
            a, b = (model(x, modes=modes, doc_ids=doc_ids, target_modes=modes) for x in (ids, other))
        return not torch.equal(a[0, half:], b[0, half:])

    assert second_doc_moves(False, Mode.RETAIN)  # the key does something: attention crosses documents
    assert not second_doc_moves(True, Mode.RETAIN)
    assert not second_doc_moves(False, Mode.FORGET)  # still mode-masked: retain never reads forget
