"""Architecture as data: family presets, grouped-query / multi-query attention with whole-KV-group
forget units, exact against the independent reference and across TP ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.backend.distributed import init_distributed
from pipeline.codes import Mode, ParamClass
from pipeline.config import PRESETS, ConfigError, load_config
from pipeline.engine.engine import build_model
from pipeline.model.ablate import ablate
from pipeline.model.shapes import model_shapes, num_params
from pipeline.model.tp_state import gather_full_state_dict, load_full_state_dict
from tests.support import reference_model
from tests.support.batches import mixed_batch
from tests.support.compare import assert_all_equivalent, assert_equivalent, mismatches
from tests.support.configs import gqa_config, tiny_config
from tests.support.launch import run_scenario
from tests.support.mutations import kv_mutation

TOL = dict(rtol=1e-4, atol=1e-6)


def test_presets_fill_features_and_keys_override_them():
    no_heads = {"sgtm": {"domains": [{"name": "f", "heads": 0, "units": 4}]}}
    moe = {"sgtm": {"domains": [{"name": "f", "heads": 0, "units": 0, "experts": 1}]}}  # MoE: no dense units
    for arch, preset in PRESETS.items():
        sgtm = moe if preset.get("n_experts") else no_heads
        m = load_config(None, [], data={"model": {"arch": arch}, **sgtm}).model
        for k in ("norm", "positions", "mlp", "bias", "tie_embeddings", "rope_theta"):
            assert getattr(m, k) == preset[k], (arch, k)
    m = load_config(None, ["model.arch=llama3", "model.n_heads=8", "model.d_model=64"], data=no_heads).model
    assert (m.n_kv_heads, m.rope_theta, m.tie_embeddings) == (2, 500000.0, False)
    m = load_config(None, ["model.arch=gpt-neo", "model.norm=rmsnorm", "model.positions=rope"], data=no_heads).model
    assert (m.norm, m.positions, m.mlp) == ("rmsnorm", "rope", "gelu")


@pytest.mark.parametrize("arch,over", [("gpt-neo", {}), ("llama", {}), ("llama3", {"n_heads": 8}),
                                       ("gpt-neo", {"n_kv_heads": 2, "positions": "rope"}),
                                       ("llama3", {"n_heads": 8, "n_kv_heads": 1, "bias": True})])
def test_num_params_counts_the_built_model(single_process_world, arch, over):
    cfg = tiny_config(arch, "sgtm", two_domains=False, model=over,
                      sgtm={"domains": [{"name": "es", "heads": 0, "units": 4}]})
    _, model = build_model(cfg, single_process_world)
    assert built_shapes(model) == {s.name: (s.numel, s.sharded) for s in model_shapes(cfg.model, padded=True)}
    built = sum(p.numel() for p in model.parameters())
    pad = (cfg.model.padded_vocab_size - cfg.model.vocab_size) * cfg.model.d_model
    pad *= 1 if cfg.model.tie_embeddings else 2
    assert built - pad == num_params(cfg.model)


def built_shapes(model) -> dict[str, tuple[int, bool]]:
    """Every parameter of a built (TP=1) model: its element count and whether megatron splits it over TP."""
    return {n: (p.numel(), bool(getattr(p, "tensor_model_parallel", False))) for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv,heads", [(2, [4, 5, 6, 7]), (4, [2, 3]), (1, [])])
@pytest.mark.parametrize("strategy", ["sgtm", "none"])
def test_gqa_matches_the_reference_per_class(single_process_world, n_kv, heads, strategy):
    """Grouped-query (2 and 4 query heads per KV head) and multi-query attention: loss and every
    gradient slice equal the reference (which expands K/V per query head itself)."""
    cfg = gqa_config(n_kv, heads, strategy=strategy)
    batch = mixed_batch(n_domains=1)
    part, model = build_model(cfg, single_process_world)
    loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                 target_modes=batch["target_modes"])
    loss.backward()
    state = gather_full_state_dict(model)
    pos = reference_model.reference_position_modes(batch["modes"], batch["labels"], batch["target_modes"])
    flags = dict(act_mask=strategy == "sgtm", mode_aware=strategy == "sgtm")
    hc = [part.head_class(i) for i in range(cfg.model.n_layers)]
    uc = [part.unit_class(i) for i in range(cfg.model.n_layers)]
    n = batch["labels"].numel()  # the objective divides by B x S (pipeline.model.transformer.training_loss)
    for p_name, p in model.named_parameters():
        role = p.sgtm_role
        for cls in {int(c) for c in role.classes}:
            if strategy == "none" or cls == ParamClass.JOINT_ALL:
                w = torch.ones_like(pos, dtype=torch.float)
            elif cls < 0:
                w = (pos < Mode.FORGET).float()
            else:
                w = ((pos < Mode.FORGET) | (pos == Mode.FORGET + cls)).float()
            params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
            per_tok = reference_model.per_token_loss(params, cfg.model, hc, uc, batch["input_ids"], batch["labels"],
                                                     batch["modes"], batch["doc_ids"],
                                                     target_modes=batch["target_modes"], **flags)
            ((per_tok * w).sum() / n).backward()
            sel = role.slice_mask(p, {cls}).expand_as(p)
            torch.testing.assert_close(p.grad[sel], params[p_name].grad[sel], **TOL,
                                       msg=lambda m, a=p_name, c=cls: f"{a} class {c}: {m}")
    torch.testing.assert_close(loss.detach(), per_tok.sum().detach() / n, **TOL)
    if heads:  # the forget group's K/V rows are forget: retain-mode tokens never update them
        role = model.blocks[0].attn.qkv.weight.sgtm_role
        assert int((role.classes == 0).sum()) == (len(heads) + 2 * len(heads) // (8 // n_kv)) * cfg.model.head_dim


@pytest.mark.parametrize("over,match", [
    ({"model": {"n_heads": 8, "n_kv_heads": 3}}, r"^model.n_kv_heads: must be a positive divisor of n_heads=8"),
    ({"sgtm": {"domains": [{"name": "es", "heads": [4, 5], "units": 2}]}},
     r"^sgtm.domains\[0\].heads: with model.n_kv_heads=2, 4 query heads share a KV head .* whole KV groups"),
    ({"sgtm": {"domains": [{"name": "es", "heads": 2, "units": 2}]}}, r"^sgtm.domains\[0\].heads: .*multiple of 4"),
    # TP neither divides n_kv_heads nor is a multiple of it (TP=4 with 2 KV heads is replication)
    ({"engine": {"tensor_parallel": 2}, "model": {"n_heads": 6, "n_kv_heads": 3, "d_model": 48}},
     r"^engine.tensor_parallel: 2 must divide model.n_kv_heads=3 .* or be a multiple of it"),
    ({"engine": {"tensor_parallel": 6}, "model": {"n_heads": 12, "n_kv_heads": 4, "d_model": 48, "d_ff": 96}},
     r"^engine.tensor_parallel: 6 must divide model.n_kv_heads=4"),
])
def test_invalid_gqa_combinations_are_one_line_errors(over, match):
    data = {"model": {"arch": "llama3", "n_heads": 8, "n_kv_heads": 2, "d_model": 32, "d_ff": 64,
                      **over.get("model", {})},
            "sgtm": {"domains": [{"name": "es", "heads": 4, "units": 2}], **over.get("sgtm", {})},
            "engine": over.get("engine", {})}
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [], data=data)
    assert "\n" not in str(e.value)


GQA_TP_CASES = {
    "gqa2_forget_on_rank1": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 2},
                             "sgtm": {"domains": [{"name": "es", "heads": [4, 5, 6, 7], "units": [3, 40]}]}},
    "gqa4_forget_split": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 4},
                          "sgtm": {"domains": [{"name": "es", "heads": [2, 3, 4, 5], "units": [3, 40]}]}},
    # Multi-query at TP=2: the one KV head replicated on both ranks (no forget group can exist:
    # it would take every head), forget units on both ranks.
    "mqa_replicated": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 1},
                       "sgtm": {"domains": [{"name": "es", "heads": [], "units": [3, 40]}]}},
    # Mutation: the replicated K/V rows' gradient not summed over the copies; must be seen below.
    "mut_mqa_kv_grads_not_summed": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 1},
                                    "sgtm": {"domains": [{"name": "es", "heads": [], "units": [3, 40]}]},
                                    "mutation": "kv_grads_not_summed"},
}
# TP=4 with 2 KV heads: each KV head on two ranks; the forget group (KV head 1, query heads 4-7)
# split over ranks 2 and 3, which both hold its K/V, forget on each (4 processes: parallel marker).
GQA_TP4_CASES = {
    "gqa2_replicated_forget_split": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 2},
                                     "sgtm": {"domains": [{"name": "es", "heads": [4, 5, 6, 7], "units": [3, 40]}]}},
    "mut_gqa2_kv_grads_not_summed": {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 2},
                                     "sgtm": {"domains": [{"name": "es", "heads": [4, 5, 6, 7], "units": [3, 40]}]},
                                     "mutation": "kv_grads_not_summed"},
}


def _replica_copies_equal(model) -> bool:
    """Whether every TP rank holding a copy of a replicated KV head holds the same gradient of it."""
    from megatron.core import parallel_state as ps

    same = True
    for p in model.parameters():
        c = int(getattr(p, "tp_kv_replicas", 1))
        if c > 1:
            tail = p.grad[-int(p.tp_kv_tail):].contiguous()
            parts = [torch.empty_like(tail) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, tail, group=ps.get_tensor_model_parallel_group())
            same &= all(torch.equal(parts[r], parts[r - r % c]) for r in range(len(parts)))
    return same


def scenario_tp_grads_configs(out: Path, cases: dict[str, dict], tp: int = 2) -> dict:
    """TP=``tp`` loss and gathered gradients of a mixed batch for named tiny_config overrides
    (optional ``mutation``), whether replicated KV copies hold equal gradients, the per-partition
    clip norms, and the gathered weights after ablating domain 0 on every shard."""
    from pipeline.components.clipping import PartitionClipper

    result = {}
    for name, over in cases.items():
        cfg = tiny_config(over["arch"], "sgtm", tp=tp, two_domains=False, model=over.get("model", {}),
                          sgtm=over.get("sgtm", {}))
        d = init_distributed(cfg.engine)
        with kv_mutation(over.get("mutation")):
            part, model = build_model(cfg, d)
            batch = mixed_batch(n_domains=1)
            loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"],
                         doc_ids=batch["doc_ids"], target_modes=batch["target_modes"])
            loss.backward()
        full, grads = gather_full_state_dict(model), gather_full_state_dict(model, grads=True)
        copies_equal = _replica_copies_equal(model)
        clipper = PartitionClipper(model, 1, 1e9, torch.device("cpu"))  # per-partition norms (ZeRO-0 path)
        clipper.clip_param_grads()
        ablate(model, [0])
        ablated = gather_full_state_dict(model)
        owned = [None] * d.world_size
        dist.all_gather_object(owned, part.owned(d.tp_rank))
        if d.rank == 0:
            torch.save({"state": full, "grads": grads, "loss": loss.detach(), "ablated": ablated},
                       out / f"tp{tp}_{name}.pt")
        result[name] = {"owned": owned, "replica_grads_equal": copies_equal,
                        "kv_replicas": part.kv_replicas, "clip_norms": clipper.last_norms.tolist()}
    return result


@pytest.fixture(scope="module")
def gqa_tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("gqa_tp2")
    return out, run_scenario(2, scenario_tp_grads_configs, out, cases=GQA_TP_CASES)


@pytest.fixture(scope="module")
def gqa_tp4(tmp_path_factory):
    out = tmp_path_factory.mktemp("gqa_tp4")
    return out, run_scenario(4, scenario_tp_grads_configs, out, cases=GQA_TP4_CASES, tp=4)


def _tp1_grads(world, over: dict, saved: dict):
    """The TP=1 model with the TP>1 run's weights, its loss and gradients on the same batch."""
    cfg = tiny_config(over["arch"], "sgtm", tp=1, two_domains=False, model=over["model"], sgtm=over["sgtm"])
    _, model = build_model(cfg, world)
    load_full_state_dict(model, saved["state"])
    batch = mixed_batch(n_domains=1)
    loss = model(batch["input_ids"], labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                 target_modes=batch["target_modes"])
    loss.backward()
    return model, loss.detach()


def _clip_norms(model) -> list[float]:
    """The per-partition clip norms of the model's gradients (one process)."""
    from pipeline.components.clipping import PartitionClipper

    clipper = PartitionClipper(model, 1, 1e9, torch.device("cpu"))
    grads = [p.grad.clone() for p in model.parameters()]
    clipper.clip_param_grads()
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad.copy_(g)
    return clipper.last_norms.tolist()


def _grad_mismatches(model, saved: dict) -> list[str]:
    """Names of the gradients that differ (per tensor relative to its scale: tests/support/compare.py)."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [line.split(":")[0] for line in mismatches(saved["grads"], grads)]


@pytest.mark.parametrize("name", [n for n in GQA_TP_CASES if not n.startswith("mut_")])
def test_gqa_tp2_equals_tp1(single_process_world, gqa_tp2, name):
    """GQA at TP=2 (each rank holds whole KV groups, or with one KV head a copy of it): loss and
    every gathered gradient equal TP=1 (per tensor relative to its scale), with the forget group on one rank or forget
    groups on both; replicated K/V copies hold equal gradients; ablation per shard equals TP=1's."""
    out, result = gqa_tp2
    over = GQA_TP_CASES[name]
    saved = torch.load(out / f"tp2_{name}.pt", weights_only=True)
    model, loss = _tp1_grads(single_process_world, over, saved)
    assert_equivalent(saved["loss"], loss, "loss")
    assert_all_equivalent(saved["grads"], {n: p.grad for n, p in model.named_parameters()})
    assert result[name]["replica_grads_equal"] is True
    assert result[name]["kv_replicas"] == (2 if name == "mqa_replicated" else 1)
    assert result[name]["clip_norms"] == pytest.approx(_clip_norms(model), rel=1e-5)  # K/V copies counted once
    ablate(model, [0])
    for pname, p in model.named_parameters():
        assert torch.equal(saved["ablated"][pname], p.detach()), pname
    owned = result[name]["owned"]
    heads = [owned[r]["es"].get("0", {}).get("heads", []) for r in range(2)]
    units = [owned[r]["es"].get("0", {}).get("units", []) for r in range(2)]
    if name == "gqa2_forget_on_rank1":
        assert heads == [[], [4, 5, 6, 7]]
    elif name == "gqa4_forget_split":
        assert heads == [[2, 3], [4, 5]]
    else:
        assert heads == [[], []] and units == [[3], [40]]


def test_gqa_tp2_mutation_unsummed_replicated_kv_grads_is_seen(single_process_world, gqa_tp2):
    """Mutation: without the all-reduce over the copies of the replicated KV head, the copies'
    gradients differ and the gathered K/V rows (rank 0's copy) miss rank 1's query heads' part."""
    out, result = gqa_tp2
    name = "mut_mqa_kv_grads_not_summed"
    saved = torch.load(out / f"tp2_{name}.pt", weights_only=True)
    model, loss = _tp1_grads(single_process_world, GQA_TP_CASES[name], saved)
    assert_equivalent(saved["loss"], loss, "loss")  # the forward is untouched
    assert result[name]["replica_grads_equal"] is False
    assert _grad_mismatches(model, saved) == [f"blocks.{i}.attn.qkv.weight" for i in range(len(model.blocks))]


@settings(max_examples=60, deadline=None)
@given(n_kv=st.sampled_from([1, 2, 4]), tp=st.sampled_from([1, 2, 4, 8]), per=st.sampled_from([1, 2, 4]),
       hd=st.integers(1, 3), cols=st.integers(1, 3))
def test_kv_layout_shards_and_merges_back(n_kv, tp, per, hd, cols):
    """Any TP size against any number of KV heads: sharding the logical KV-group-major QKV rows
    and merging the shards gives them back; with replication every rank of a group holds that
    group's K/V rows, the merge keeps one copy, and each query row lands on exactly one rank."""
    from pipeline.model.tp_state import merge_tp_shards, shard_logical

    n_heads = n_kv * per
    if n_heads % tp:
        return
    full = torch.arange(n_kv * (per + 2) * hd * cols, dtype=torch.float).view(-1, cols)
    replicas = max(1, tp // n_kv)
    layout = (0, 1, replicas, 2 * hd) if replicas > 1 else (0, 1)
    parts = [shard_logical(full, r, tp, *layout) for r in range(tp)]
    assert all(p.shape[0] == (n_heads // tp + 2 * max(1, n_kv // tp)) * hd for p in parts)
    assert torch.equal(merge_tp_shards(parts, *layout), full)
    if replicas > 1:
        kv = [full.view(n_kv, (per + 2) * hd, cols)[g, per * hd:] for g in range(n_kv)]
        assert all(torch.equal(parts[r][-2 * hd:], kv[r // replicas]) for r in range(tp))


def test_replicated_tp2_state_exports_one_kv_copy(single_process_world, gqa_tp2, tmp_path, monkeypatch):
    """The gathered state of the one-KV-head model trained at TP=2 (K/V replicated on both ranks)
    exports as LlamaForCausalLM with num_key_value_heads=1, logits equal to the TP=1 model's."""
    from transformers import AutoModelForCausalLM

    from pipeline.train.export_hf import export_hf
    from pipeline.train.offline import LoadedModel, write_model_dir

    out, _ = gqa_tp2
    over = GQA_TP_CASES["mqa_replicated"]
    saved = torch.load(out / "tp2_mqa_replicated.pt", weights_only=True)
    cfg = tiny_config(over["arch"], "sgtm", tp=1, two_domains=False, model=over["model"], sgtm=over["sgtm"])
    _, model = build_model(cfg, single_process_world)
    load_full_state_dict(model, saved["state"])
    assert saved["state"]["blocks.0.attn.qkv.weight"].shape[0] == cfg.model.d_model + 2 * cfg.model.kv_dim
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = write_model_dir(LoadedModel(cfg, saved["state"], {"partition": {}, "ablated_domains": []}), tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(export_hf(src, tmp_path / "hf"), local_files_only=True).eval()
    assert hf.config.num_key_value_heads == 1
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[..., :97], rtol=0, atol=1e-4)


@pytest.mark.parallel
@pytest.mark.parametrize("name", list(GQA_TP4_CASES))
def test_gqa_replicated_kv_tp4_equals_tp1(single_process_world, gqa_tp4, name):
    """TP=4 with 2 KV heads (each on two ranks): loss and every gathered gradient equal TP=1 (per
    tensor relative to its scale) with the forget group's query heads split over ranks 2 and 3, both holding its K/V as
    forget; ablation on every shard equals TP=1's; the mutation (copies' gradients not summed) fails."""
    out, result = gqa_tp4
    saved = torch.load(out / f"tp4_{name}.pt", weights_only=True)
    model, loss = _tp1_grads(single_process_world, GQA_TP4_CASES[name], saved)
    assert_equivalent(saved["loss"], loss, "loss")
    r = result[name]
    assert r["kv_replicas"] == 2
    if name.startswith("mut_"):
        assert r["replica_grads_equal"] is False
        assert _grad_mismatches(model, saved) == [f"blocks.{i}.attn.qkv.weight" for i in range(len(model.blocks))]
        return
    assert r["replica_grads_equal"] is True
    assert_all_equivalent(saved["grads"], {n: p.grad for n, p in model.named_parameters()})
    assert r["clip_norms"] == pytest.approx(_clip_norms(model), rel=1e-5)
    heads = [r["owned"][k]["es"].get("0", {}).get("heads", []) for k in range(4)]
    assert heads == [[], [], [4, 5], [6, 7]]
    ablate(model, [0])
    for pname, p in model.named_parameters():
        assert torch.equal(saved["ablated"][pname], p.detach()), pname


@pytest.mark.parametrize("fragment,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55)])
def test_llama3_fragments_have_the_published_sizes(fragment, billions):
    cfg = load_config(data={"model": {"base": f"models/{fragment}.yaml"},
                            "sgtm": {"domains": [{"name": "bio", "heads": 8, "units": 448}]}})
    m = cfg.model
    assert (m.n_kv_heads, m.rope_theta, m.mlp, m.tie_embeddings) == (8, 500000.0, "swiglu", False)
    assert round(num_params(m) / 1e9, 2) == billions


def test_llama3_8b_experiment_composes():
    cfg = load_config("configs/experiments/llama3_8b_8xh100.yaml")
    assert cfg.model.arch == "llama3" and cfg.model.query_heads_per_kv_head == 4


@pytest.mark.parametrize("n_kv,heads", [(2, [4, 5, 6, 7]), (1, [])])
def test_gqa_hf_export_matches_logits_full_and_ablated(single_process_world, tmp_path, monkeypatch, n_kv, heads):
    """LlamaForCausalLM with num_key_value_heads: the exported logits equal ours to 1e-4, for the
    trained-from-init model and for its ablated form (forget group's rows and columns zero)."""
    from transformers import AutoModelForCausalLM

    from pipeline.model.ablate import ablate
    from pipeline.train.export_hf import export_hf
    from pipeline.train.offline import LoadedModel, write_model_dir

    cfg = gqa_config(n_kv, heads)
    _, model = build_model(cfg, single_process_world)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in ("full", "ablated"):
        if name == "ablated":
            ablate(model, [0])
        meta = {"partition": {}, "ablated_domains": [0] if name == "ablated" else []}
        src = write_model_dir(LoadedModel(cfg, gather_full_state_dict(model), meta), tmp_path / f"m_{name}")
        out = export_hf(src, tmp_path / f"hf_{name}")
        hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        assert hf.config.num_key_value_heads == n_kv
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids)[..., :97], rtol=0, atol=1e-4)


def test_export_refuses_an_architecture_no_hf_class_computes(single_process_world, tmp_path):
    from pipeline.train.export_hf import export_hf
    from pipeline.train.offline import LoadedModel, write_model_dir

    cfg = tiny_config("gpt-neo", "sgtm", two_domains=False, model={"positions": "rope"})
    _, model = build_model(cfg, single_process_world)
    src = write_model_dir(LoadedModel(cfg, gather_full_state_dict(model), {"partition": {}, "ablated_domains": []}),
                          tmp_path / "m")
    with pytest.raises(ValueError, match=r"^model: no HF class matches norm=layernorm, positions=rope"):
        export_hf(src, tmp_path / "hf")

