"""The whole model in one file: a decoder-only transformer on megatron-core's TP layers.

Families are presets of a few features (``pipeline.config.PRESETS``), one code path:
  norm: layernorm | rmsnorm; positions: learned | rope (theta); mlp: gelu | swiglu (a forget
  unit owns its gate and up rows); bias; tied embeddings; n_kv_heads (grouped-query attention:
  a forget attention unit is a whole KV group, its K/V rows and its query heads).
  gpt-neo is the paper's family; llama and llama3 (GQA, theta 500000) the ones labs train.

Megatron-core supplies the parallel parameters (sharded init, TP attributes), the mappings that
communicate, ``parallel_state`` and the vocab-parallel loss. The block is ours: attention through
``scaled_dot_product_attention`` with the per-batch mask of :meth:`TokenMasks.build` (causal,
within a document, and never across a forget/non-forget boundary), and every linear's local
matmul through :func:`pipeline.sgtm.masking.selective_linear`, so per-token masking happens
where the gradient is made.

Layout: [batch, seq, hidden]; with sequence parallelism (``engine.sequence_parallel``, megatron's
scheme) [seq, batch, hidden] throughout, the residual stream and norms holding seq/tp tokens per
rank: gathered along the sequence before each column-parallel linear, reduce-scattered after
each row-parallel one. The per-token masks are built in the activations' token order and the
sequence-sharded regions read this rank's rows (``TokenMasks.local``); replicated parameters
applied to sharded tokens (norm gains/biases, row-parallel output biases) all-reduce their
gradients over TP in autograd (:func:`_sp_param`). docs/architecture.md, "Sequence parallelism".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.layers import SplitFeatures
from pipeline.model.moe import MoE, aux_loss
from pipeline.sgtm.masking import (
    FeatureSplit,
    FiniteGradFn,
    InputFeatures,
    TokenMasks,
    elementwise_affine,
    finite_only,
    grad_gate,
    selective_linear,
)
from pipeline.sgtm.partition import ForgetPartition, ParamRole

IGNORE_INDEX = -100


def _tag(param: nn.Parameter | None, role: ParamRole) -> None:
    """Attach the partition's role to a parameter (read by masking, ablation, clipping, tests)."""
    if param is not None:
        param.sgtm_role = role


def _allow(masks: TokenMasks | None, role: ParamRole) -> torch.Tensor | None:
    return None if masks is None else masks.allow[int(role.classes[0])]


def _local(masks: TokenMasks | None) -> TokenMasks | None:
    """The masks of the tokens a sequence-sharded region holds (all of them without SP)."""
    return masks if masks is None or masks.local is None else masks.local


def _sp_param(p: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """A replicated parameter used on this rank's part of the sequence: with SP each rank's
    gradient is a partial sum over its tokens, so the backward all-reduces it over TP (megatron's
    copy-to-TP-region: identity forward, all-reduce backward). Megatron leaves that to its
    optimizer for parameters marked ``sequence_parallel``; here DeepSpeed owns the optimizer, so it
    happens in autograd and every TP rank holds the same full gradient before DeepSpeed sees it."""
    return copy_to_tensor_model_parallel_region(p) if sequence_parallel else p


class _SumReplicaGrads(torch.autograd.Function):
    """Identity forward; the backward sums the gradient of the replicated K/V rows (the last
    ``tail`` rows) over the TP ranks holding a copy of the same KV head, so every copy gets the
    whole gradient (each rank's is the part from its own query heads) and the copies stay equal.
    One all-reduce over the TP group of a [groups, tail, ...] buffer with this rank's slot filled
    (no sub-groups to create; n_kv_heads < TP, so it is at most n_kv_heads times one slot)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, replicas: int, tail: int) -> torch.Tensor:
        ctx.replicas, ctx.tail = replicas, tail
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        slot = parallel_state.get_tensor_model_parallel_rank() // ctx.replicas
        buf = g.new_zeros((tp // ctx.replicas, ctx.tail) + tuple(g.shape[1:]))
        buf[slot] = g[-ctx.tail:]
        torch.distributed.all_reduce(buf, group=parallel_state.get_tensor_model_parallel_group())
        g = g.clone()
        g[-ctx.tail:] = buf[slot]
        return g, None, None


def _replica_param(p: torch.Tensor | None) -> torch.Tensor | None:
    """``p`` with its replicated K/V rows' gradient summed over their copies (see above)."""
    replicas = int(getattr(p, "tp_kv_replicas", 1)) if p is not None else 1
    return p if replicas == 1 else _SumReplicaGrads.apply(p, replicas, int(p.tp_kv_tail))


class SplitColumnLinear(ColumnParallelLinear):
    """Megatron's column-parallel linear whose local matmul masks weight gradients per token."""

    def __init__(self, in_features: int, out_features: int, role: ParamRole, *, config: ModelParallelConfig,
                 init_method, bias: bool, stride: int = 1, tied: bool = False):
        super().__init__(in_features, out_features, config=config, init_method=init_method, bias=bias,
                         gather_output=False, stride=stride, skip_weight_param_allocation=tied)
        self.split = FeatureSplit(role.classes)
        self.role = role
        _tag(self.weight, role)
        _tag(self.bias, role)

    def forward(self, x: torch.Tensor, masks: TokenMasks | None,  # type: ignore[override]
                weight: torch.Tensor | None = None, sequence_sharded: bool | None = None) -> torch.Tensor:
        """``weight`` is given only for a tied LM head (the embedding's weight). Under sequence
        parallelism ``x`` is this rank's [S/tp, B, in], gathered along the sequence here
        (``sequence_sharded=False``: ``x`` already holds the whole sequence)."""
        weight = _replica_param(self.weight) if weight is None else weight
        if self.sequence_parallel if sequence_sharded is None else sequence_sharded:
            x = gather_from_sequence_parallel_region(x)
        elif parallel_state.get_tensor_model_parallel_world_size() > 1:
            x = copy_to_tensor_model_parallel_region(x)
        return selective_linear(x, weight, _replica_param(self.bias), self.split, 0, masks)


class SplitRowLinear(RowParallelLinear):
    """Megatron's row-parallel linear with per-token weight-gradient masking; its (unsplit)
    output bias is added after the all-reduce (SP: reduce-scatter) with its own per-token mask."""

    def __init__(self, in_features: int, out_features: int, role: ParamRole, bias_role: ParamRole, *,
                 config: ModelParallelConfig, init_method, bias: bool):
        super().__init__(in_features, out_features, config=config, init_method=init_method, bias=bias,
                         input_is_parallel=True, skip_bias_add=True)
        self.split = FeatureSplit(role.classes)
        self.bias_role = bias_role
        _tag(self.weight, role)
        _tag(self.bias, bias_role)

    def forward(self, x: torch.Tensor, masks: TokenMasks | None,  # type: ignore[override]
                features: InputFeatures | None = None) -> torch.Tensor:
        """``features``: the classes of ``x``'s columns, for the per-token activation masking
        (``x`` is then edited in place: pass a fresh activation)."""
        y = selective_linear(x, self.weight, None, self.split, 1, masks, features)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y)  # [S/tp, B, out]
        else:
            y = reduce_from_tensor_model_parallel_region(y)
        if self.bias is None:
            return y
        return elementwise_affine(y, None, _sp_param(self.bias, self.sequence_parallel),
                                  _allow(_local(masks), self.bias_role))


class Norm(nn.Module):
    """LayerNorm or RMSNorm whose gain/bias gradients are masked per token (under sequence
    parallelism: over this rank's tokens, then all-reduced over TP)."""

    def __init__(self, d: int, kind: str, eps: float, role: ParamRole, sequence_parallel: bool = False):
        super().__init__()
        self.rms = kind == "rmsnorm"
        self.eps = eps
        self.role = role
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(d))
        for p in (self.weight, self.bias):
            _tag(p, role)
            if p is not None:
                p.sequence_parallel = sequence_parallel  # megatron's mark (gradient all-reduced over TP)

    def forward(self, x: torch.Tensor, masks: TokenMasks | None) -> torch.Tensor:
        if self.rms:
            xf = x.float()
            n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        else:
            n = F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        sp = self.sequence_parallel
        bias = None if self.bias is None else _sp_param(self.bias, sp)
        return elementwise_affine(n, _sp_param(self.weight, sp), bias, _allow(_local(masks), self.role))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd]; the rotate-half convention (as HF Llama, so exports match)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def _replicated_init(init, logical_rows: int, tp: int, replicas: int, tail: int):
    """Megatron's CPU init draws the whole (here: replicated, tp x local rows) master on every
    rank and keeps its chunk. This draws the logical TP=1 master instead (the same numbers as at
    TP=1) and lays it out as the ranks' shards, so every copy of a KV head starts equal."""
    from pipeline.model.tp_state import shard_logical

    def fill(master: torch.Tensor) -> None:
        logical = torch.empty(logical_rows, master.shape[1], dtype=master.dtype)
        init(logical)
        with torch.no_grad():
            master.copy_(torch.cat([shard_logical(logical, r, tp, 0, 1, replicas, tail) for r in range(tp)]))
    return fill


class Attention(SplitFeatures):
    def __init__(self, cfg: ModelConfig, part: ForgetPartition, layer: int, tp_rank: int,
                 mpc: ModelParallelConfig, init, out_init):
        super().__init__()
        self.seq_first = mpc.sequence_parallel  # activations [S, B, ...] (else [B, S, ...])
        self.local_heads = part.heads_per_rank
        self.local_groups = part.kv_heads_per_rank
        self.per_group = part.heads_per_rank // part.kv_heads_per_rank  # local query heads per KV head
        self.head_dim = hd = cfg.head_dim
        d = cfg.d_model
        # Rows are KV-group-major ([q of the group's heads, k_g, v_g] per KV head g; multi-head:
        # [q_h, k_h, v_h] per head), so a contiguous TP shard holds whole groups. With
        # n_kv_heads < TP each KV head is replicated on ``replicas`` ranks: rank r holds
        # [its query heads of group r // replicas, k_g, v_g]; the K/V rows' gradient is summed
        # over the copies (_SumReplicaGrads), and the checkpoints/gathers keep one copy (tp_state).
        replicas, tp = part.kv_replicas, part.tp_size
        rows = tp * (self.local_heads + 2 * self.local_groups) * hd  # = d + 2 kv_dim unless replicated
        qkv_init = init if replicas == 1 else _replicated_init(init, d + 2 * cfg.kv_dim, tp, replicas, 2 * hd)
        self.qkv = SplitColumnLinear(d, rows, part.role("qkv", layer, tp_rank), config=mpc,
                                     init_method=qkv_init, bias=cfg.bias)
        if replicas > 1:
            for p in (self.qkv.weight, self.qkv.bias):
                if p is not None:
                    p.tp_kv_replicas, p.tp_kv_tail = replicas, 2 * hd
        self.out = SplitRowLinear(d, d, part.role("attn_out", layer, tp_rank),
                                  part.role("attn_out_bias", layer, tp_rank), config=mpc,
                                  init_method=out_init, bias=cfg.bias)
        self._init_features(part.local_head_class(layer, tp_rank), cfg.head_dim)

    def _heads_first(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S, H, hd] or (SP) [S, B, H, hd] -> [B, H, S, hd]."""
        return t.permute(1, 2, 0, 3) if self.seq_first else t.transpose(1, 2)

    def forward(self, x, masks: TokenMasks, rope):
        r = self.per_group
        qkv = self.qkv(x, masks)  # the whole sequence (SP: gathered), [B, S, .] or [S, B, .]
        isolating = masks is not None and masks.isolating
        if isolating:  # the kernel multiplies masked entries by 0: keep non-finite ones out of it
            qkv = finite_only(qkv)
        L0, L1 = qkv.shape[:2]
        qkv = qkv.view(L0, L1, self.local_groups, r + 2, self.head_dim)
        q = self._heads_first(qkv[..., :r, :].reshape(L0, L1, self.local_heads, self.head_dim))  # [B, H, S, hd]
        k, v = (self._heads_first(qkv[..., r + i, :]) for i in (0, 1))  # [B, G, S, hd]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = masks.attn_live
        if masks.attn_detached is not None:
            # detached_context: forget queries also read non-forget keys/values, through detached
            # copies appended along the key axis (the two masks are disjoint, one softmax).
            k, v = torch.cat([k, k.detach()], dim=2), torch.cat([v, v.detach()], dim=2)
            mask = torch.cat([masks.attn_live, masks.attn_detached], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=r > 1)
        if isolating:
            o = FiniteGradFn.apply(o)
        # [B, H, S, hd] -> [B, S, H*hd] (SP: [S, B, H*hd]): a fresh copy (SDPA keeps its own
        # output for backward), which the out projection masks per head in place.
        o = o.permute(2, 0, 1, 3) if self.seq_first else o.transpose(1, 2)
        o = self._ablate(o).reshape(L0, L1, self.local_heads * self.head_dim)
        return self.out(o, masks, self.features)


class MLP(SplitFeatures):
    def __init__(self, cfg: ModelConfig, part: ForgetPartition, layer: int, tp_rank: int,
                 mpc: ModelParallelConfig, init, out_init):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        d, f = cfg.d_model, cfg.d_ff
        # SwiGLU: master rows [gate; up], stride 2 gives every rank [gate_r; up_r].
        self.fc1 = SplitColumnLinear(d, 2 * f if self.swiglu else f, part.role("mlp_in", layer, tp_rank),
                                     config=mpc, init_method=init, bias=cfg.bias, stride=2 if self.swiglu else 1)
        self.fc2 = SplitRowLinear(f, d, part.role("mlp_out", layer, tp_rank),
                                  part.role("mlp_out_bias", layer, tp_rank), config=mpc,
                                  init_method=out_init, bias=cfg.bias)
        self._init_features(part.local_unit_class(layer, tp_rank))

    def forward(self, x, masks):
        h = self.fc1(x, masks)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.fc2(self._ablate(h), masks, self.features)


class Block(nn.Module):
    def __init__(self, cfg, part, layer, tp_rank, mpc, init, out_init):
        super().__init__()
        sp = mpc.sequence_parallel
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, part.role("norm", layer, tp_rank), sp)
        self.attn = Attention(cfg, part, layer, tp_rank, mpc, init, out_init)
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, part.role("norm", layer, tp_rank), sp)
        if cfg.n_experts:  # mixture of experts (forget experts, expert parallelism): pipeline/model/moe.py
            # its shared experts (model.moe_shared_experts) are one MLP of this file, built in its turn
            shared = lambda c: MLP(c, part, layer, tp_rank, mpc, init, out_init)  # noqa: E731
            self.mlp = MoE(cfg, part, layer, tp_rank, mpc, init, out_init, shared_mlp=shared)
        else:
            self.mlp = MLP(cfg, part, layer, tp_rank, mpc, init, out_init)

    def forward(self, x, masks, rope):
        x = x + self.attn(self.norm1(x, masks), masks, rope)
        return x + self.mlp(self.norm2(x, masks), masks)


class RemoteBlock(nn.Module):
    """Stands in for a block another pipeline stage holds (pipeline/engine/pipe.py)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    @staticmethod
    def unless_kept(block: Block, layer: int, keep: range | None) -> nn.Module:
        return block if keep is None or layer in keep else RemoteBlock(layer)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"block {self.layer} lives on another pipeline stage")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, S] from vocab-parallel logits; 0 where labels == -100.

    Consumes ``logits``: megatron's vocab-parallel cross-entropy works in place on fp32 input."""
    per_token = vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
    return torch.where(labels != IGNORE_INDEX, per_token, 0.0)


def training_loss(per_token: torch.Tensor) -> torch.Tensor:
    """The training objective: the sum of the per-token losses over the micro-batch's B x S
    positions (ignored ones count 0). The denominator is fixed by the shape, not by how many
    positions are labelled: a count of labelled positions would include the forget ones, and so
    scale every retain gradient by a number the forget data decides (docs/architecture.md,
    "The invariant"). Evaluation reports the mean over labelled positions instead."""
    return per_token.sum() / per_token.numel()


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` returns the mean next-token loss (and per-token losses on demand)."""

    def __init__(self, cfg: ModelConfig, partition: ForgetPartition, strategy: str = "sgtm",
                 sequence_parallel: bool = False, keep_blocks: range | None = None):
        """``keep_blocks`` (a pipeline stage's blocks): the others are built, so the RNG advances
        exactly as for the whole model, and dropped at once (:class:`RemoteBlock`)."""
        super().__init__()
        self.cfg = cfg
        self.partition = partition
        self.strategy = strategy
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if tp_size != partition.tp_size:
            raise ValueError(f"partition built for TP={partition.tp_size}, model parallel state is TP={tp_size}")
        if sequence_parallel and tp_size < 2:
            raise ValueError(f"engine.sequence_parallel: needs engine.tensor_parallel > 1, the TP group has {tp_size}")
        self.sequence_parallel = sequence_parallel
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if sequence_parallel:
            from pipeline.model.cpu_compat import patch_sequence_parallel_mappings

            patch_sequence_parallel_mappings()  # a no-op where CUDA is available
        mpc = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                                  perform_initialization=True, gradient_accumulation_fusion=False,
                                  params_dtype=torch.float32, sequence_parallel=sequence_parallel)
        init = lambda w: nn.init.normal_(w, 0.0, cfg.init_std)  # noqa: E731
        out_std = cfg.init_std / math.sqrt(2.0 * cfg.n_layers)  # GPT-2's scaled residual init
        out_init = lambda w: nn.init.normal_(w, 0.0, out_std)  # noqa: E731

        self.embedding = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.d_model, init_method=init, config=mpc)
        self.embedding_role = partition.role("embedding", None, tp_rank)
        _tag(self.embedding.weight, self.embedding_role)
        self.position_embedding = None
        if cfg.positions == "learned":
            self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
            init(self.position_embedding.weight)
            _tag(self.position_embedding.weight, partition.role("position_embedding", None, tp_rank))
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(RemoteBlock.unless_kept(Block(cfg, partition, i, tp_rank, mpc, init, out_init),
                                                            i, keep_blocks) for i in range(cfg.n_layers))
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, partition.role("final_norm", None, tp_rank),
                               sequence_parallel)
        tied = bool(cfg.tie_embeddings)
        head_role = self.embedding_role if tied else partition.role("lm_head", None, tp_rank)
        self.lm_head = SplitColumnLinear(cfg.d_model, cfg.padded_vocab_size, head_role, config=mpc,
                                         init_method=init, bias=False, tied=tied)

    # ---- forward ---------------------------------------------------------------------------

    def token_masks(self, modes: torch.Tensor | None, labels: torch.Tensor | None = None,
                    target_modes: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> TokenMasks:
        if modes is not None and doc_ids is None and self.cfg.document_masking:
            raise ValueError("batch: 'modes' given without 'doc_ids' while model.document_masking is true "
                             "(attention would cross documents); send doc_ids or set model.document_masking=false")
        if not self.cfg.document_masking:  # attention crosses documents (still mode-masked: docs/architecture.md)
            doc_ids = None
        return TokenMasks.build(modes, self.strategy, len(self.partition.domains), labels=labels,
                                target_modes=target_modes, doc_ids=doc_ids,
                                cross_mode=self.partition.sgtm.cross_mode_attention,
                                sequence_shard=(self.tp_rank, self.tp_size) if self.sequence_parallel else None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                modes: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                target_modes: torch.Tensor | None = None,
                return_per_token: bool = False, return_hidden: bool = False):
        """Returns the training loss (:func:`training_loss`), or per-token losses
        [B, S] with ``return_per_token``, or vocab-parallel logits when ``labels`` is None, or
        the final normed hidden states with ``return_hidden`` (see :meth:`logits`).

        ``modes`` [B, S] is each position's mode, ``target_modes`` the mode of each label token
        (optional, see :func:`pipeline.sgtm.masking.position_modes`), ``doc_ids`` [B, S] which
        document each position belongs to (attention stays inside a document)."""
        B, S = input_ids.shape
        sp = self.sequence_parallel
        if sp and S % self.tp_size:
            raise ValueError(f"engine.sequence_parallel: sequence length {S} is not divisible by "
                             f"engine.tensor_parallel={self.tp_size}")
        masks = self.token_masks(modes, labels, target_modes, doc_ids)
        # Under SP the activations (and the masks' token order) are [S, B, ...].
        x = grad_gate(self.embedding(input_ids.t() if sp else input_ids), _allow(masks, self.embedding_role))
        rope = None
        if self.position_embedding is not None:
            pos = self.position_embedding(torch.arange(S, device=input_ids.device))
            pos = pos[:, None].expand(S, B, -1) if sp else pos[None].expand(B, S, -1)
            x = x + grad_gate(pos, _allow(masks, self.position_embedding.weight.sgtm_role))
        else:
            rope = (self.rope_cos[:S], self.rope_sin[:S])
        if sp:
            x = scatter_to_sequence_parallel_region(x)  # [S/tp, B, H]: this rank's part of the sequence
        for block in self.blocks:
            x = block(x, masks, rope)
        x = self.final_norm(x, masks)
        if return_hidden:
            if sp:  # the whole sequence, [B, S, H] as without SP
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
                x = x.transpose(0, 1).contiguous()
            return x
        logits = self.lm_head(x, masks, self._head_weight())  # SP: gathered inside, [S, B, V/tp]
        if labels is None:
            return logits.transpose(0, 1) if sp else logits
        per_token = token_losses(logits, labels.t().contiguous() if sp else labels)
        if return_per_token:
            return per_token.t() if sp else per_token
        loss = training_loss(per_token)
        if self.cfg.n_experts and self.training:  # + the MoE load-balancing loss (non-forget tokens only)
            aux = aux_loss(self)
            loss = loss if aux is None else loss + aux
        return loss

    def _head_weight(self) -> torch.Tensor | None:
        return self.embedding.weight if self.cfg.tie_embeddings else None

    def logits(self, hidden: torch.Tensor, masks: TokenMasks | None = None) -> torch.Tensor:
        """Vocab-parallel logits [B, S, V/tp] from final hidden states [B, S, H] of the whole
        sequence (also under sequence parallelism: ``return_hidden`` gathers them)."""
        return self.lm_head(hidden, masks, self._head_weight(), sequence_sharded=False)

    def set_ablated(self, domains: list[int]) -> None:
        for m in self.modules():
            if isinstance(m, SplitFeatures):
                m.set_ablated(domains)
