"""The forget partition and config validation: ownership, variants, one-line errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.codes import ParamClass
from pipeline.config import ConfigError, ModelConfig, SGTMConfig, load_config
from pipeline.engine.engine import build_model
from pipeline.model.ablate import ablate
from pipeline.model.shapes import num_params
from pipeline.sgtm.partition import ForgetPartition
from tests.support.batches import mixed_batch
from tests.support.configs import tiny_config


def part(tp=1, **sgtm):
    model = ModelConfig(n_layers=4, d_model=64, n_heads=8, d_ff=256)
    domains = sgtm.pop("domains", [{"name": "bio", "heads": 1, "units": 64}])
    from pipeline.config import from_dict

    return ForgetPartition(model, from_dict(SGTMConfig, {"domains": domains, **sgtm}, "sgtm"), tp)


def test_default_assignment_and_rank_ownership():
    p = part(tp=2, domains=[{"name": "bio", "heads": 1, "units": 64}, {"name": "cyber", "heads": 2, "units": 32}])
    assert p.heads(0, 0) == [0] and p.heads(0, 1) == [1, 2]
    assert p.units(3, 0) == list(range(64)) and p.units(3, 1) == list(range(64, 96))
    owned0, owned1 = p.owned(0), p.owned(1)
    assert owned0["bio"][0]["heads"] == [0] and 0 not in owned1["bio"]  # rank 1 owns no bio parameters
    assert owned0["cyber"][0]["units"] == list(range(64, 96))
    assert p.local_head_class(0, 1).tolist() == [ParamClass.RETAIN] * 4


def test_explicit_indices_across_tp_boundary():
    p = part(tp=2, domains=[{"name": "bio", "heads": [3, 4], "units": [120, 130]}])
    assert p.owned(0)["bio"][0] == {"heads": [3], "units": [120]}
    assert p.owned(1)["bio"][0] == {"heads": [4], "units": [130]}
    assert p.local_unit_class(0, 1)[130 - 128] == 0


def test_variants_are_switches_of_the_same_object():
    attn_only = part(scope="attention")
    assert attn_only.units(0, 0) == [] and attn_only.heads(0, 0) == [0]
    mlp_only = part(scope="mlp")
    assert mlp_only.heads(0, 0) == [] and len(mlp_only.units(0, 0)) == 64
    subset = part(domains=[{"name": "bio", "heads": 1, "units": 8, "layers": [1, 3]}])
    assert subset.heads(0, 0) == [] and subset.heads(1, 0) == [0] and subset.units(3, 0) == list(range(8))
    joint_out = part(output_projections="joint", joint_update="all")
    assert joint_out.role("attn_out", 0, 0).classes.tolist() == [ParamClass.JOINT_ALL]
    assert joint_out.role("mlp_out_bias", 0, 0).classes.tolist() == [ParamClass.JOINT_ALL]
    split = part()
    assert split.role("attn_out_bias", 0, 0).classes.tolist() == [ParamClass.RETAIN]
    assert split.role("attn_out", 0, 0).classes[:8].tolist() == [0] * 8  # head 0's input columns
    mixed = part(joint_update="non_forget", embedding_update="all")
    assert mixed.role("embedding", None, 0).classes.tolist() == [ParamClass.JOINT_ALL]
    assert mixed.role("final_norm", None, 0).classes.tolist() == [ParamClass.JOINT_NON_FORGET]


@pytest.mark.parametrize("sgtm, key", [
    ({"domains": [{"name": "bio", "heads": 8}]}, "sgtm.domains[0].heads"),
    ({"domains": [{"name": "bio", "heads": [9]}]}, "sgtm.domains[0].heads"),
    ({"domains": [{"name": "bio", "units": 300}]}, "sgtm.domains[0].units"),
    ({"domains": [{"name": "a", "heads": [1]}, {"name": "b", "heads": [1]}]}, "sgtm.domains[1].heads"),
    ({"domains": [{"name": "a"}, {"name": "a"}]}, "sgtm.domains"),
    ({"domains": [{"name": "bio", "layers": [7]}]}, "sgtm.domains[0].layers"),
    ({"domains": [{"name": "bio", "units": -1}]}, "sgtm.domains[0].units"),
])
def test_invalid_partitions_fail_with_one_line_naming_the_key(sgtm, key):
    with pytest.raises(ConfigError) as err:
        part(**sgtm)
    msg = str(err.value)
    assert msg.startswith(key + ":") and "\n" not in msg, msg


@pytest.mark.parametrize("override, key", [
    ("model.n_layers=two", "model.n_layers"),
    ("model.n_layerz=2", "model.n_layerz"),
    ("model.d_model=-8", "model.d_model"),
    ("model.arch=gpt5", "model.arch"),
    ("engine.tensor_parallel=3", "engine.tensor_parallel"),
    ("engine.zero_stage=3", "engine.zero_stage"),
    ("sgtm.strategy=magic", "sgtm.strategy"),
    ("sgtm.joint_update=some", "sgtm.joint_update"),
    ("sgtm.domains=[{name: x, heads: 40}]", "sgtm.domains[0].heads"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("bogus=1", "bogus"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/experiments/core_tiny.yaml", [override])
    msg = str(err.value)
    assert msg.startswith(key + ":") and "\n" not in msg, msg


def test_model_fragments_compose_and_match_their_names():
    cfg = load_config("configs/experiments/core_tiny.yaml", ["model=models/wiki-254m.yaml"])
    assert cfg.model.n_layers == 16 and cfg.model.d_model == 1024
    assert 240e6 < num_params(cfg.model) < 270e6
    cfg = load_config(data={"model": {"base": "models/tinystories-64m.yaml", "n_layers": 2}})
    assert cfg.model.n_layers == 2 and cfg.model.d_model == 512


def test_ablation_zeroes_exactly_the_forget_slices_and_removes_dependence(single_process_world):
    cfg = tiny_config("gpt-neo")
    _, model = build_model(cfg, single_process_world)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ablate(model, [0])
    for n, p in model.named_parameters():
        sel = p.sgtm_role.slice_mask(p, {0}).expand_as(p)
        assert (p[sel] == 0).all(), n
        assert torch.equal(p[~sel], before[n][~sel]), n
    assert (model.blocks[0].mlp.fc1.weight[5] != 0).any()  # forget[fr] untouched
    batch = mixed_batch()
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        for p in model.parameters():  # scribble over every forget[es] slice
            sel = p.sgtm_role.slice_mask(p, {0}).expand_as(p)
            p[sel] = torch.randn(int(sel.sum()))
        assert torch.equal(model(batch["input_ids"], doc_ids=batch["doc_ids"]), logits)
        model.set_ablated([])  # without the switch the scribbles would matter: the check can fail
        assert not torch.equal(model(batch["input_ids"], doc_ids=batch["doc_ids"]), logits)


@pytest.mark.parametrize("tie,embedding_update,joint_update",
                         [(True, "non_forget", "all"), (False, "all", "non_forget")])
def test_partition_summary_says_what_the_code_does(single_process_world, capsys, tie, embedding_update, joint_update):
    """`sgtm partition` prints each joint parameter's class as the model assigns it (a tied LM head
    is the embedding matrix, so it follows embedding_update) and the MAY_UPDATE table."""
    from pipeline.cli import main
    from pipeline.codes import class_name

    overrides = [f"model.tie_embeddings={str(tie).lower()}", f"sgtm.embedding_update={embedding_update}",
                 f"sgtm.joint_update={joint_update}"]
    assert main(["partition", "--config", "configs/experiments/core_tiny.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    cfg = load_config("configs/experiments/core_tiny.yaml", overrides)
    part, model = build_model(cfg, single_process_world)
    head = class_name(int(model.lm_head.weight.sgtm_role.classes[0]) if not tie
                      else int(model.embedding.weight.sgtm_role.classes[0]), part.domains)
    emb = class_name(int(model.embedding.weight.sgtm_role.classes[0]), part.domains)
    norm = class_name(int(model.final_norm.weight.sgtm_role.classes[0]), part.domains)
    assert f"embeddings {emb}" in out and f"norms and final norm {norm}" in out
    assert (f"LM head tied to the token embedding: {head}" if tie else f"LM head (untied): {head}") in out
    assert "who may update what (strategy sgtm" in out
    assert "joint_non_forget" in out and "other_forget" in out
