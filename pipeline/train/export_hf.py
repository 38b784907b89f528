"""Export to a HF ``transformers`` model directory (safetensors + tokenizer), loadable offline.

The HF class follows the architecture's features (:func:`hf_family`): learned positions, LayerNorm,
GELU, biases, tied embeddings -> ``GPT2LMHeadModel`` (attention scaled by 1/sqrt(head_dim): exactly
our block); RoPE, RMSNorm, SwiGLU, no biases -> ``LlamaForCausalLM`` (``num_key_value_heads`` for
grouped-query attention). Any other mix is a one-line error.
Padded vocabulary rows are dropped. HF models attend causally over the whole sequence, so
logits match ours for sequences holding one document (packed documents need our doc mask).

**Calibrated models** (``sgtm ablate --calibrate``) add a per-vocabulary bias to the logits, and
neither HF class has an LM-head bias. For gpt-neo the export carries it exactly, in a
``GPT2LMHeadModel`` that is wider by one hidden unit per head (:func:`fold_logit_bias_gpt2`); a
llama model cannot carry it (RMSNorm has no additive term), so its export stops with one line
unless ``--drop-calibration`` asks for the uncalibrated ablated model. Never a silent drop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.train.offline import LoadedModel, load_any


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama': the HF class that computes exactly what this architecture computes."""
    if cfg.n_experts:
        raise ValueError(f"model.n_experts: {cfg.n_experts} routed experts; exporting mixture-of-experts models to "
                         f"Hugging Face is not supported (pipeline/model/moe.py has no HF counterpart here)")
    if (cfg.norm, cfg.positions, cfg.mlp) == ("layernorm", "learned", "gelu") and cfg.bias and cfg.tie_embeddings \
            and cfg.n_kv_heads == cfg.n_heads:
        return "gpt2"
    if (cfg.norm, cfg.positions, cfg.mlp) == ("rmsnorm", "rope", "swiglu") and not cfg.bias:
        return "llama"
    raise ValueError(f"model: no HF class matches norm={cfg.norm}, positions={cfg.positions}, mlp={cfg.mlp}, "
                     f"bias={cfg.bias}, tie_embeddings={cfg.tie_embeddings}, n_kv_heads={cfg.n_kv_heads} "
                     f"(GPT2LMHeadModel: layernorm/learned/gelu/biases/tied/multi-head; "
                     f"LlamaForCausalLM: rmsnorm/rope/swiglu/no biases)")


def _split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our QKV rows are KV-group-major ([q of the group's heads, k_g, v_g] per KV head g; multi-head:
    [q_h, k_h, v_h] per head); return the q, k, v blocks in HF's head order."""
    G, r, hd = cfg.n_kv_heads, cfg.query_heads_per_kv_head, cfg.head_dim
    w = w.view(G, r + 2, hd, *w.shape[1:])
    rest = w.shape[3:]
    return (w[:, :r].reshape(G * r * hd, *rest), w[:, r].reshape(G * hd, *rest), w[:, r + 1].reshape(G * hd, *rest))


def gpt2_state(state: dict, cfg: ModelConfig):
    from transformers import GPT2Config

    v = cfg.vocab_size
    hf = GPT2Config(vocab_size=v, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                    n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu",
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    tie_word_embeddings=True, scale_attn_weights=True)
    out = {"transformer.wte.weight": state["embedding.weight"][:v],
           "transformer.wpe.weight": state["position_embedding.weight"],
           "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": state["final_norm.bias"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        q, k, v_ = _split_qkv(state[src + "attn.qkv.weight"], cfg)
        qb, kb, vb = _split_qkv(state[src + "attn.qkv.bias"], cfg)
        out.update({  # HF GPT-2 uses Conv1D: weight is [in, out]
            dst + "ln_1.weight": state[src + "norm1.weight"], dst + "ln_1.bias": state[src + "norm1.bias"],
            dst + "attn.c_attn.weight": torch.cat([q, k, v_]).t(),
            dst + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            dst + "attn.c_proj.weight": state[src + "attn.out.weight"].t(),
            dst + "attn.c_proj.bias": state[src + "attn.out.bias"],
            dst + "ln_2.weight": state[src + "norm2.weight"], dst + "ln_2.bias": state[src + "norm2.bias"],
            dst + "mlp.c_fc.weight": state[src + "mlp.fc1.weight"].t(),
            dst + "mlp.c_fc.bias": state[src + "mlp.fc1.bias"],
            dst + "mlp.c_proj.weight": state[src + "mlp.fc2.weight"].t(),
            dst + "mlp.c_proj.bias": state[src + "mlp.fc2.bias"],
        })
    return hf, out


def fold_logit_bias_gpt2(hf, out: dict, cfg: ModelConfig, bias: torch.Tensor):
    """A GPT-2 whose logits are exactly the given model's plus ``bias``: ``n_embd`` grows from d to
    E = d + H (H heads), and the new hidden units carry the constant the LM head needs.

    Why it is exact: the H extra residual units always hold the mean of the d original ones
    (embeddings and every output projection get extra columns that average their other columns).
    A LayerNorm over [x, m, ..., m] then has the same mean as over x and variance d/E times x's, so
    with epsilon scaled by d/E and gains by sqrt(d/E) every original unit normalises exactly as
    before, and every extra unit normalises to 0: it never reaches attention or the MLP (their
    extra input rows are zero). The final LayerNorm's bias is 1 on the first extra unit, so the
    LM head (untied) gets a constant 1 there, and its weight column for that unit is ``bias``.
    Heads grow from hd to hd + 1 dims (q, k, v zero in the new one; queries scaled by
    sqrt((hd + 1) / hd) for HF's 1/sqrt(head_dim))."""
    d, H, hd, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    E, hd1 = d + H, hd + 1

    def widen_rows(w: torch.Tensor) -> torch.Tensor:  # [d, ...] -> [E, ...], new rows zero
        return torch.cat([w, w.new_zeros(H, *w.shape[1:])])

    def mean_cols(w: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., E], new columns = mean
        return torch.cat([w, w.mean(-1, keepdim=True).expand(*w.shape[:-1], H)], dim=-1)

    def heads_out(w: torch.Tensor) -> torch.Tensor:  # [..., H*hd] -> [..., H*(hd+1)], new dim zero
        w = w.reshape(*w.shape[:-1], H, hd)
        return torch.cat([w, w.new_zeros(*w.shape[:-1], 1)], dim=-1).reshape(*w.shape[:-2], E)

    def heads_in(w: torch.Tensor) -> torch.Tensor:  # [H*hd, ...] -> [H*(hd+1), ...], new rows zero
        w = w.reshape(H, hd, *w.shape[1:])
        return torch.cat([w, w.new_zeros(H, 1, *w.shape[2:])], dim=1).reshape(E, *w.shape[2:])

    gain = (d / E) ** 0.5
    q_scale = (hd1 / hd) ** 0.5
    new = {"transformer.wte.weight": mean_cols(out["transformer.wte.weight"]),
           "transformer.wpe.weight": mean_cols(out["transformer.wpe.weight"]),
           "lm_head.weight": torch.cat([out["transformer.wte.weight"], bias[:v, None].to(torch.float32),
                                        bias.new_zeros(v, H - 1, dtype=torch.float32)], dim=1)}
    for key, t in out.items():
        if key in new:
            continue
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            new[key] = torch.cat([t * gain, t.new_zeros(H)])
        elif key.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")):
            extra = t.new_zeros(H)
            if key.endswith("ln_f.bias"):
                extra[0] = 1.0
            new[key] = torch.cat([t, extra])
        elif key.endswith("attn.c_attn.weight") or key.endswith("attn.c_attn.bias"):
            q, k, v_ = t.split(d, dim=-1)
            rows = widen_rows if t.dim() == 2 else (lambda x: x)
            new[key] = torch.cat([heads_out(rows(q)) * q_scale, heads_out(rows(k)), heads_out(rows(v_))], dim=-1)
        elif key.endswith("attn.c_proj.weight"):
            new[key] = mean_cols(heads_in(t))
        elif key.endswith(("attn.c_proj.bias", "mlp.c_proj.bias", "mlp.c_proj.weight")):
            new[key] = mean_cols(t)
        elif key.endswith("mlp.c_fc.weight"):
            new[key] = widen_rows(t)
        elif key.endswith("mlp.c_fc.bias"):
            new[key] = t
        else:
            raise KeyError(f"fold_logit_bias_gpt2: no rule for {key}")
    hf.n_embd = E
    hf.layer_norm_epsilon = cfg.norm_eps * d / E
    hf.tie_word_embeddings = False
    return hf, new


def llama_state(state: dict, cfg: ModelConfig):
    from transformers import LlamaConfig

    v, f = cfg.vocab_size, cfg.d_ff
    hf = LlamaConfig(vocab_size=v, hidden_size=cfg.d_model, intermediate_size=f, num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                     max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                     rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                     tie_word_embeddings=bool(cfg.tie_embeddings), attention_bias=False, mlp_bias=False,
                     hidden_act="silu")
    head = state["embedding.weight"] if cfg.tie_embeddings else state["lm_head.weight"]
    out = {"model.embed_tokens.weight": state["embedding.weight"][:v], "model.norm.weight": state["final_norm.weight"],
           "lm_head.weight": head[:v]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v_ = _split_qkv(state[src + "attn.qkv.weight"], cfg)
        fc1 = state[src + "mlp.fc1.weight"]
        out.update({
            dst + "input_layernorm.weight": state[src + "norm1.weight"],
            dst + "post_attention_layernorm.weight": state[src + "norm2.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v_,
            dst + "self_attn.o_proj.weight": state[src + "attn.out.weight"],
            dst + "mlp.gate_proj.weight": fc1[:f], dst + "mlp.up_proj.weight": fc1[f:],
            dst + "mlp.down_proj.weight": state[src + "mlp.fc2.weight"],
        })
    return hf, out


def save_tokenizer(spec: str, out: Path) -> None:
    """Write HF tokenizer files for our tokenizer spec ('gpt2' or a trained tokenizer .json)."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.tokenizer import EOT, load_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(spec).tokenizer, eos_token=EOT, bos_token=EOT)
    tok.save_pretrained(str(out))


def _calibration(loaded: LoadedModel, path: str | Path, drop: bool) -> tuple[torch.Tensor | None, str]:
    """The bias to carry (or None) and what sgtm_meta.json says about it; one line if it cannot be carried."""
    if loaded.bias is None:
        return None, "none"
    if drop:
        return None, "dropped (--drop-calibration): logits are the ablated model's, without the bias"
    if hf_family(loaded.cfg.model) != "gpt2":
        raise ValueError(
            f"{path}: holds a calibrated output bias (sgtm ablate --calibrate), which LlamaForCausalLM cannot "
            f"carry (no LM-head bias); add --drop-calibration to export the ablated model without it")
    return loaded.bias, "folded: exact, in a GPT-2 wider by one hidden unit per head (export_hf.fold_logit_bias_gpt2)"


def export_hf(path: str | Path, out: str | Path, drop_calibration: bool = False) -> Path:
    """Write ``out`` (atomically). A calibrated model's bias is carried exactly (gpt-neo), or the
    export is refused unless ``drop_calibration`` (llama)."""
    loaded = load_any(path)
    cfg = loaded.cfg.model
    bias, calibration = _calibration(loaded, path, drop_calibration)
    hf_cfg, state = gpt2_state(loaded.state, cfg) if hf_family(cfg) == "gpt2" else llama_state(loaded.state, cfg)
    if bias is not None:
        hf_cfg, state = fold_logit_bias_gpt2(hf_cfg, state, cfg, bias)
    from transformers import AutoModelForCausalLM

    if loaded.cfg.data is not None:
        from pipeline.data.tokenizer import load_tokenizer

        hf_cfg.bos_token_id = hf_cfg.eos_token_id = load_tokenizer(loaded.cfg.data.tokenizer).eot_id
    model = AutoModelForCausalLM.from_config(hf_cfg)
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith(("attn.bias", "attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(loaded.cfg.data.tokenizer if loaded.cfg.data is not None else "gpt2", tmp)
    (tmp / "sgtm_meta.json").write_text(json.dumps({**loaded.meta, "arch": cfg.arch, "calibration_bias": calibration},
                                                   indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
