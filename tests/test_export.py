"""`sgtm export-hf` of a calibrated model (`sgtm ablate --calibrate`): the HF model's logits are the
pipeline's calibrated logits (ablated model + output bias), or the export stops with one line."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config


def _model_dir(world, tmp_path, arch: str, d_model: int, n_heads: int, n_layers: int, seed: int,
               bias_scale: float | None):
    """A model directory as `sgtm ablate [--calibrate]` writes it: forget head/units zeroed (and
    switched off), every parameter perturbed away from its init (LayerNorm gains and biases too),
    and a random per-vocabulary bias over the padded vocabulary."""
    from pipeline.engine.engine import build_model
    from pipeline.model.ablate import ablate
    from pipeline.model.tp_state import gather_full_state_dict
    from pipeline.train.offline import LoadedModel, write_model_dir

    base = "models/tiny-1m.yaml" if arch == "gpt-neo" else "models/tiny-llama-1m.yaml"
    cfg = load_config(data={"name": "export", "model": {"base": base, "vocab_size": 300, "n_layers": n_layers,
                                                         "d_model": d_model, "n_heads": n_heads, "d_ff": 2 * d_model,
                                                         "max_seq_len": 24},
                            "sgtm": {"domains": [{"name": "spanish", "heads": [1], "units": 8}]}})
    torch.manual_seed(seed)
    _, model = build_model(cfg, world)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ablate(model, [0])
    bias = None if bias_scale is None else torch.randn(cfg.model.padded_vocab_size) * bias_scale
    meta = {"partition": {"domains": ["spanish"]}, "ablated_domains": ["spanish"]}
    return write_model_dir(LoadedModel(cfg, gather_full_state_dict(model), meta, bias), tmp_path / f"{arch}_model")


def _logits(src, out, ids):
    """(HF export's logits, the pipeline's logits for the same model dir, its bias or None)."""
    from transformers import AutoModelForCausalLM

    from pipeline.train.offline import load_any, single_process_model

    loaded = load_any(src)
    ours, _ = single_process_model(loaded)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    v = loaded.cfg.model.vocab_size
    with torch.no_grad():
        return hf(ids).logits, ours(ids)[..., :v], None if loaded.bias is None else loaded.bias[:v]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from([(32, 4, 2), (48, 4, 1), (64, 8, 2), (40, 2, 3)]), seed=st.integers(0, 2**16),
       bias_scale=st.sampled_from([0.5, 3.0]))
def test_calibrated_gpt_neo_export_is_the_ablated_model_plus_the_bias(
        single_process_world, tmp_path_factory, monkeypatch, shape, seed, bias_scale):
    """The bias is carried exactly (1e-4) by a stock GPT2LMHeadModel, loaded offline; the export
    of the same model without a bias keeps d_model and tied embeddings."""
    from pipeline.train.export_hf import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("calibrated")
    d, heads, layers = shape
    src = _model_dir(single_process_world, tmp, "gpt-neo", d, heads, layers, seed, bias_scale)
    out = export_hf(src, tmp / "hf")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    theirs, ours, bias = _logits(src, out, ids)
    assert bias is not None and bias.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours + bias, rtol=0, atol=1e-4)
    assert (theirs - ours).abs().max() > 0.1  # the bias is really in there
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["n_embd"] == d + heads and hf_config["tie_word_embeddings"] is False
    assert json.loads((out / "sgtm_meta.json").read_text())["calibration_bias"].startswith("folded")

    plain = _model_dir(single_process_world, tmp, "gpt-neo", d, heads, layers, seed, None)
    out = export_hf(plain, tmp / "hf_plain")
    theirs, ours, _ = _logits(plain, out, ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert json.loads((out / "config.json").read_text())["n_embd"] == d


def test_calibrated_llama_export_is_one_line_unless_drop_calibration(single_process_world, tmp_path, monkeypatch,
                                                                     capsys):
    """LlamaForCausalLM cannot carry the bias: `sgtm export-hf` says so in one line naming the model
    and the flag, writes nothing; with --drop-calibration the export is the ablated model and its
    sgtm_meta.json says the bias was dropped."""
    from pipeline.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _model_dir(single_process_world, tmp_path, "llama", 32, 4, 2, 0, 1.0)
    out = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sgtm: error: {src}: holds a calibrated output bias (sgtm ablate --calibrate), which "
                   "LlamaForCausalLM cannot carry (no LM-head bias); add --drop-calibration to export the "
                   "ablated model without it"]
    assert not out.exists()
    assert main(["export-hf", "--checkpoint", str(src), "--out", str(out), "--drop-calibration"]) == 0
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    theirs, ours, bias = _logits(src, out, ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert bias is not None  # the source still holds it; the export does not
    assert json.loads((out / "sgtm_meta.json").read_text())["calibration_bias"].startswith("dropped")
