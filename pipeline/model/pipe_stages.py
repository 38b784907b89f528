"""The transformer as a DeepSpeed ``PipelineModule``: embedding first, blocks split across stages,
final norm + LM head last, the loss on the last stage.

The stage layers wrap the modules of one :class:`pipeline.model.transformer.Transformer` (its
``VocabParallelEmbedding``, :class:`Block` s with megatron-core TP layers inside, final ``Norm``
and LM head): the same parameters, initialised exactly as at PP=1, the same masking code.

Between stages a tuple of tensors travels (DeepSpeed's pipeline sends tensors only):
``(hidden, modes, doc_ids, labels, target_modes)``, the four integer ones [B, S] in batch order.
Every stage rebuilds its :class:`TokenMasks` from them once per micro-batch (the layers of a stage
share it), so each block masks exactly as at PP=1. ``hidden`` is [B, S, H], or this TP rank's
[S/tp, B, H] under sequence parallelism (each rank sends its shard to the same TP rank of the
next stage). A missing optional tensor (no modes in evaluation) travels as all :data:`ABSENT`.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from torch import nn

from pipeline.model.layers import SplitFeatures
from pipeline.model.layout import canonical_name
from pipeline.model.transformer import Block, Transformer, _allow, token_losses, training_loss
from pipeline.sgtm.masking import TokenMasks, grad_gate

ABSENT = -1  # fill value of an optional [B, S] tensor that is not there (modes in evaluation)

Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def optional(t: torch.Tensor) -> torch.Tensor | None:
    return None if bool((t == ABSENT).all()) else t


def pipe_inputs(batch: dict, device: torch.device) -> tuple:
    """A train/eval batch as the pipeline engine's ``(inputs, labels)``; every stage's tensors."""
    ids = batch["input_ids"].to(device)
    absent = torch.full_like(ids, ABSENT)

    def get(key: str) -> torch.Tensor:
        t = batch.get(key)
        return absent if t is None else t.to(device)

    labels = get("labels")
    return (ids, get("modes"), get("doc_ids"), labels, get("target_modes")), labels


class StageMasks:
    """One stage's :class:`TokenMasks` of the micro-batch in flight, built once from the carried
    tensors (DeepSpeed clones a stage's inputs per micro-batch, so the ``modes`` object identifies it)."""

    def __init__(self, model: Transformer):
        self.strategy, self.n_domains = model.strategy, len(model.partition.domains)
        self.cross_mode = model.partition.sgtm.cross_mode_attention
        self.document_masking = model.cfg.document_masking
        self.shard = (model.tp_rank, model.tp_size) if model.sequence_parallel else None
        self._key: torch.Tensor | None = None
        self._masks: TokenMasks | None = None

    def __call__(self, modes: torch.Tensor, doc_ids: torch.Tensor, labels: torch.Tensor,
                 target_modes: torch.Tensor) -> TokenMasks:
        if self._key is not modes:
            m, d = optional(modes), optional(doc_ids)
            if m is not None and d is None and self.document_masking:
                raise ValueError("batch: 'modes' given without 'doc_ids' while model.document_masking is true "
                                 "(attention would cross documents); send doc_ids or set model.document_masking=false")
            d = d if self.document_masking else None  # as Transformer.token_masks: attention crosses documents
            self._masks = TokenMasks.build(m, self.strategy, self.n_domains, labels=optional(labels),
                                           target_modes=optional(target_modes), doc_ids=d,
                                           cross_mode=self.cross_mode, sequence_shard=self.shard)
            self._key = modes
        return self._masks


class EmbedStage(nn.Module):
    """Token (and learned position) embeddings, as :meth:`Transformer.forward` begins."""

    def __init__(self, model: Transformer, masks: StageMasks):
        super().__init__()
        self.embedding = model.embedding
        self.position_embedding = model.position_embedding
        self.embedding_role = model.embedding_role
        self.sequence_parallel, self.tp_size = model.sequence_parallel, model.tp_size
        self.masks = masks

    def forward(self, inputs: Carry) -> Carry:
        input_ids, modes, doc_ids, labels, target_modes = inputs
        B, S = input_ids.shape
        sp = self.sequence_parallel
        if sp and S % self.tp_size:
            raise ValueError(f"engine.sequence_parallel: sequence length {S} is not divisible by "
                             f"engine.tensor_parallel={self.tp_size}")
        masks = self.masks(modes, doc_ids, labels, target_modes)
        x = grad_gate(self.embedding(input_ids.t() if sp else input_ids), _allow(masks, self.embedding_role))
        if self.position_embedding is not None:
            pos = self.position_embedding(torch.arange(S, device=input_ids.device))
            pos = pos[:, None].expand(S, B, -1) if sp else pos[None].expand(B, S, -1)
            x = x + grad_gate(pos, _allow(masks, self.position_embedding.weight.sgtm_role))
        if sp:
            x = scatter_to_sequence_parallel_region(x)
        return x, modes, doc_ids, labels, target_modes


class BlockStage(nn.Module):
    """One transformer :class:`Block`, unchanged; RoPE tables shared with the model."""

    def __init__(self, model: Transformer, block: Block, masks: StageMasks):
        super().__init__()
        self.block = block
        self.rope = model.position_embedding is None
        if self.rope:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.masks = masks

    def forward(self, inputs: Carry) -> Carry:
        x, modes, doc_ids, labels, target_modes = inputs
        S = modes.shape[1]
        rope = (self.rope_cos[:S], self.rope_sin[:S]) if self.rope else None
        x = self.block(x, self.masks(modes, doc_ids, labels, target_modes), rope)
        return x, modes, doc_ids, labels, target_modes


class HeadStage(nn.Module):
    """Final norm and the (untied) LM head: vocab-parallel logits, [S, B, V/tp] under SP."""

    def __init__(self, model: Transformer, masks: StageMasks):
        super().__init__()
        self.final_norm = model.final_norm
        self.lm_head = model.lm_head
        self.masks = masks

    def forward(self, inputs: Carry) -> torch.Tensor:
        x, modes, doc_ids, labels, target_modes = inputs
        masks = self.masks(modes, doc_ids, labels, target_modes)
        return self.lm_head(self.final_norm(x, masks), masks, None)


class PipeLoss:
    """``loss_fn(logits, labels)``: the training loss of :func:`training_loss` (as PP=1). With
    :attr:`per_token` (evaluation) each micro-batch's per-token losses [B, S] are appended to
    :attr:`collected` (DeepSpeed sums what the loss function returns, so it gets a scalar)."""

    def __init__(self, sequence_parallel: bool):
        self.sequence_parallel = sequence_parallel
        self.per_token = False
        self.collected: list[torch.Tensor] = []
        self.poison = False  # a test fault (``nan_loss``): the loss becomes NaN
        self.__name__ = "sgtm_token_loss"

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sp = self.sequence_parallel
        per_token = token_losses(logits, labels.t().contiguous() if sp else labels)
        if self.per_token:
            self.collected.append((per_token.t() if sp else per_token).detach())
        loss = training_loss(per_token)
        return loss * float("nan") if self.poison else loss


class SGTMPipelineModule(PipelineModule):
    """The model's stages over ``topology`` (pipe x data x model). Layer ``i + 1`` is block ``i``;
    stage ``s`` holds blocks ``[s n/pp, (s+1) n/pp)``, stage 0 also the embeddings, the last
    stage the final norm and head. Carries ``cfg``/``partition`` and :meth:`set_ablated`, so
    ablation and clipping take it as they take a :class:`Transformer`."""

    def __init__(self, model: Transformer, topology, loss_fn: PipeLoss):
        if model.cfg.tie_embeddings:
            raise ValueError("model.tie_embeddings: tied embeddings across pipeline stages are not supported")
        names = {id(p): n for n, p in model.named_parameters()}
        masks = StageMasks(model)  # one per stage: its layers share the micro-batch's masks
        layers = [EmbedStage(model, masks), *(BlockStage(model, b, masks) for b in model.blocks),
                  HeadStage(model, masks)]
        super().__init__(layers=layers, topology=topology, loss_fn=loss_fn, partition_method="type:BlockStage")
        self.cfg, self.partition, self.strategy = model.cfg, model.partition, model.strategy
        self.sequence_parallel = model.sequence_parallel
        self.stage_layers = range(self._local_start, self._local_stop)
        # This stage's parameter names -> the Transformer's (checkpoints, tests, gathering).
        self.canonical_names = {n: names[id(p)] for n, p in self.named_parameters()}
        for n, canonical in self.canonical_names.items():  # the rule offline consolidation uses
            layer, _, local = n.partition(".")
            rule = canonical_name(int(layer), local, model.cfg.n_layers)
            if rule != canonical:
                raise RuntimeError(f"pipeline parameter {n}: canonical_name gives {rule}, the model has {canonical}")

    def set_ablated(self, domains: list[int]) -> None:
        for m in self.modules():
            if isinstance(m, SplitFeatures):
                m.set_ablated(domains)
