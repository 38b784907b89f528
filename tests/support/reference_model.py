"""An independent plain-torch implementation of the model, for checking ours.

It reads a TP=1 state dict, uses no megatron layer and none of pipeline.sgtm.masking, and
spells every masking rule out directly, so the masked model can be compared against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.codes import Mode
from pipeline.config import ModelConfig

FORGET, RETAIN, UNLABELLED = int(Mode.FORGET), int(Mode.RETAIN), int(Mode.UNLABELLED)


def _norm(x, w, b, kind, eps):
    if kind == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rope(x, theta):
    """Rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd), written as complex products."""
    B, S, H, hd = x.shape
    half = hd // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * freq[None]
    rot = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)  # [S, half]
    z = torch.complex(x[..., :half], x[..., half:]) * rot[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def reference_position_modes(modes, labels, target_modes):
    """A non-forget position predicting a forget token (label not ignored) is trained as forget."""
    B, S = modes.shape
    out = modes.clone()
    for b in range(B):
        for s in range(S):
            tm = int(target_modes[b, s]) if target_modes is not None else int(modes[b, min(s + 1, S - 1)])
            if int(modes[b, s]) < FORGET and tm >= FORGET and int(labels[b, s]) != -100:
                out[b, s] = tm
    return out


def reference_attention(modes, doc_ids, mode_aware, detached_context):
    """(live, detached) [B, S, S] bool, spelled out pair by pair."""
    B, S = doc_ids.shape
    live = torch.zeros(B, S, S, dtype=torch.bool)
    det = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            for j in range(i + 1):
                if doc_ids[b, i] != doc_ids[b, j]:
                    continue
                if not mode_aware:
                    live[b, i, j] = True
                    continue
                qm, km = int(modes[b, i]), int(modes[b, j])
                if qm == km or (qm == UNLABELLED and km == RETAIN):
                    live[b, i, j] = True
                elif detached_context and qm >= FORGET and km < FORGET:
                    det[b, i, j] = True
    return live, det


def _feature_gate(t, classes, modes, act_mask, route):
    """t [B, S, F, ...]: zero forget features on retain tokens; detach non-own features on forget tokens."""
    B, S, Fdim = t.shape[:3]
    extra = [1] * (t.dim() - 3)
    keep = torch.ones(B, S, Fdim)
    grad_keep = torch.ones(B, S, Fdim)
    for b in range(B):
        for s in range(S):
            m = int(modes[b, s])
            for f in range(Fdim):
                c = int(classes[f])
                if act_mask and m == RETAIN and c >= 0:
                    keep[b, s, f] = 0.0
                if route and m >= FORGET and c != m - FORGET:
                    grad_keep[b, s, f] = 0.0
    keep = keep.view(B, S, Fdim, *extra)
    grad_keep = grad_keep.view(B, S, Fdim, *extra)
    t = t * keep
    return t * grad_keep + t.detach() * (1 - grad_keep)


def per_token_loss(params: dict[str, torch.Tensor], cfg: ModelConfig, head_class, unit_class,
                   ids, labels, modes, doc_ids, *, act_mask=False, route=False, target_modes=None,
                   mode_aware=True, detached_context=False):
    """Per-token losses [B, S] (0 where labels == -100). head_class/unit_class: per layer [H]/[F].

    ``mode_aware``: positions take their training modes and attention follows the mode rules
    (every strategy but 'none'); ``detached_context``: forget queries read non-forget keys/values
    through detached copies."""
    if mode_aware:
        modes = reference_position_modes(modes, labels, target_modes)
    P = params
    B, S = ids.shape
    d, H = cfg.d_model, cfg.n_heads
    hd, f = d // H, cfg.d_ff
    x = P["embedding.weight"][ids]
    if cfg.positions == "learned":
        x = x + P["position_embedding.weight"][:S][None]
    live, det = reference_attention(modes, doc_ids, mode_aware, detached_context)
    get = lambda k: P.get(k)  # noqa: E731
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}."
        h = _norm(x, P[pre + "norm1.weight"], get(pre + "norm1.bias"), cfg.norm, cfg.norm_eps)
        qkv = h @ P[pre + "attn.qkv.weight"].T
        if get(pre + "attn.qkv.bias") is not None:
            qkv = qkv + P[pre + "attn.qkv.bias"]
        G = cfg.n_kv_heads
        r = H // G  # query heads per KV head; rows per group: r query heads, then k, then v
        qkv = qkv.view(B, S, G, r + 2, hd)
        q = qkv[..., :r, :].reshape(B, S, H, hd)
        k = qkv[..., r, :].repeat_interleave(r, dim=2)  # query head h reads KV head h // r
        v = qkv[..., r + 1, :].repeat_interleave(r, dim=2)
        if cfg.positions == "rope":
            q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        scores_det = torch.einsum("bihd,bjhd->bhij", q, k.detach()) / math.sqrt(hd)
        scores = torch.where(det[:, None], scores_det, scores)
        scores = scores.masked_fill(~(live | det)[:, None], float("-inf"))
        p = scores.softmax(-1)
        o = torch.einsum("bhij,bjhd->bihd", p * live[:, None], v) \
            + torch.einsum("bhij,bjhd->bihd", p * det[:, None], v.detach())  # [B, S, H, hd]
        o = _feature_gate(o, head_class[layer], modes, act_mask, route)
        y = o.reshape(B, S, d) @ P[pre + "attn.out.weight"].T
        if get(pre + "attn.out.bias") is not None:
            y = y + P[pre + "attn.out.bias"]
        x = x + y
        h = _norm(x, P[pre + "norm2.weight"], get(pre + "norm2.bias"), cfg.norm, cfg.norm_eps)
        u = h @ P[pre + "mlp.fc1.weight"].T
        if get(pre + "mlp.fc1.bias") is not None:
            u = u + P[pre + "mlp.fc1.bias"]
        if cfg.mlp == "swiglu":
            u = F.silu(u[..., :f]) * u[..., f:]
        else:
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        u = _feature_gate(u, unit_class[layer], modes, act_mask, route)
        y = u @ P[pre + "mlp.fc2.weight"].T
        if get(pre + "mlp.fc2.bias") is not None:
            y = y + P[pre + "mlp.fc2.bias"]
        x = x + y
    x = _norm(x, P["final_norm.weight"], get("final_norm.bias"), cfg.norm, cfg.norm_eps)
    head = P["embedding.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    logits = x @ head.T
    loss = F.cross_entropy(logits.reshape(B * S, -1), labels.reshape(-1), ignore_index=-100, reduction="none")
    return loss.view(B, S)
