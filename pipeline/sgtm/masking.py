"""Per-token selective gradient masking: the one place where masking happens.

Per batch, :meth:`TokenMasks.build` turns the mode tensor into a few [T, 1] tensors, once.
Per layer, three small autograd functions use them where gradients are *made*, so the
result is exact for any mix of modes in any micro-batch, on any rank, and works inside
DeepSpeed ZeRO (whose hooks take ``param.grad`` away before anyone could edit it):

* :class:`SelectiveLinearFn` - a split linear layer. The weight gradient is a sum over tokens of
  outer products, so the gradient of each slice (rows of a column-parallel weight, columns of a
  row-parallel one) is computed from the tokens allowed to update that slice's class, while the
  input gradient passed upstream stays the true one. Same matmuls as plain training; the mask is
  one elementwise multiply of the split side plus a small gather/scatter for forget features.
* :class:`ElementwiseAffineFn` - ``x * weight + bias`` for norm gains/biases and the output
  biases of row-parallel layers, with per-token masking of the parameter gradients.
* :class:`GradGateFn` - identity forward, per-token gated backward; for embedding lookups,
  whose only gradient is the weight gradient.

Forward-time masking (retain-mode tokens switch forget heads/units off, gradient routing's
detach, ablation) is :func:`mask_split_activation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.sgtm.modes import FORGET
from pipeline.sgtm.modes import RETAIN as RETAIN_MODE
from pipeline.sgtm.partition import JOINT_ALL, JOINT_NON_FORGET, RETAIN

STRATEGIES = ("sgtm", "gradient_routing", "activation_masking", "none")


@dataclass
class TokenMasks:
    """Everything the layers need to know about one batch's modes, built once per batch.

    ``allow[cls]`` is a [T, 1] 0/1 tensor of which tokens may update parameters of slice class
    ``cls`` (None: every token may). ``retain_tokens`` [B, S] marks tokens that run with forget
    features off; ``route_domain`` [B, S] is the forget domain of each token for gradient
    routing (-1 for non-forget tokens)."""

    allow: dict[int, torch.Tensor | None]
    retain_tokens: torch.Tensor | None
    route_domain: torch.Tensor | None

    @staticmethod
    def build(modes: torch.Tensor | None, strategy: str, n_domains: int,
              dtype: torch.dtype = torch.float32) -> TokenMasks:
        if strategy not in STRATEGIES:
            raise ValueError(f"sgtm.strategy: expected one of {STRATEGIES}, got {strategy!r}")
        allow: dict[int, torch.Tensor | None] = {RETAIN: None, JOINT_NON_FORGET: None, JOINT_ALL: None}
        allow.update({d: None for d in range(n_domains)})
        if modes is None or strategy == "none":
            return TokenMasks(allow, None, None)
        modes = modes.long()
        retain_tokens = modes == RETAIN_MODE
        if strategy == "activation_masking":
            return TokenMasks(allow, retain_tokens, None)
        if strategy == "gradient_routing":
            route = torch.where(modes >= FORGET, modes - FORGET, torch.full_like(modes, -1))
            return TokenMasks(allow, None, route)
        # sgtm
        flat = modes.reshape(-1, 1)
        non_forget = flat < FORGET
        allow[RETAIN] = non_forget.to(dtype)
        allow[JOINT_NON_FORGET] = allow[RETAIN]
        if n_domains > 1:  # with one domain every token may update forget[0]
            for d in range(n_domains):
                allow[d] = (non_forget | (flat == FORGET + d)).to(dtype)
        return TokenMasks(allow, retain_tokens, None)


class FeatureSplit:
    """The slice classes along the split side of one linear layer, grouped for fast masking.

    The most frequent class (normally retain) is applied as one multiply over all features; the
    other classes (the few forget features) are re-gathered and overwritten."""

    def __init__(self, feature_class: torch.Tensor):
        classes, counts = torch.unique(feature_class, return_counts=True)
        self.base = int(classes[counts.argmax()])
        self.groups = [(int(c), (feature_class == c).nonzero().flatten())
                       for c in classes if int(c) != self.base]
        self.classes = [self.base] + [c for c, _ in self.groups]

    def to(self, device: torch.device) -> FeatureSplit:
        self.groups = [(c, idx.to(device)) for c, idx in self.groups]
        return self

    def apply(self, m: torch.Tensor, allow: dict[int, torch.Tensor | None]) -> torch.Tensor:
        """Zero the rows of ``m`` [T, F] (tokens) that may not update each feature's class."""
        base_allow = allow[self.base]
        out = m if base_allow is None else m * base_allow
        for cls, idx in self.groups:
            a = allow[cls]
            if a is base_allow:
                continue
            sub = m.index_select(1, idx)
            if a is not None:
                sub = sub * a
            out = out.index_copy(1, idx, sub) if out is m else out.index_copy_(1, idx, sub)
        return out


class SelectiveLinearFn(torch.autograd.Function):
    """y = x W^T + b with per-token, per-slice weight gradients and an exact input gradient.

    ``split_dim`` 0: classes are on output rows (column-parallel), masking the output gradient.
    ``split_dim`` 1: classes are on input columns (row-parallel), masking the saved input."""

    @staticmethod
    def forward(ctx, x, weight, bias, split: FeatureSplit | None, split_dim: int, masks: TokenMasks | None):
        ctx.save_for_backward(x, weight)
        ctx.split, ctx.split_dim, ctx.masks, ctx.has_bias = split, split_dim, masks, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_in = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        if ctx.split is not None and ctx.masks is not None:
            if ctx.split_dim == 0:
                g = ctx.split.apply(g, ctx.masks.allow)
            else:
                xs = ctx.split.apply(xs, ctx.masks.allow)
        grad_w = g.t().matmul(xs) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_in, grad_w, grad_b, None, None, None


class ElementwiseAffineFn(torch.autograd.Function):
    """y = x * weight + bias (weight/bias over the last dim, either may be None), with the
    parameter gradients summed only over tokens in ``allow`` [T, 1]."""

    @staticmethod
    def forward(ctx, x, weight, bias, allow):
        ctx.save_for_backward(x if weight is not None else None, weight, allow)
        ctx.has_bias = bias is not None
        y = x * weight if weight is not None else x
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, allow = ctx.saved_tensors
        grad_in = grad_out * weight if weight is not None else grad_out
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if allow is not None:
            g = g * allow
        grad_w = (g * x.reshape(-1, x.shape[-1])).sum(0) if weight is not None else None
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_in, grad_w, grad_b, None


class GradGateFn(torch.autograd.Function):
    """Identity forward; the backward keeps only tokens in ``allow`` [T, 1]."""

    @staticmethod
    def forward(ctx, y, allow):
        ctx.save_for_backward(allow)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (allow,) = ctx.saved_tensors
        shape = grad_out.shape
        return (grad_out.reshape(-1, shape[-1]) * allow).reshape(shape), None


def selective_linear(x, weight, bias, split: FeatureSplit | None, split_dim: int,
                     masks: TokenMasks | None) -> torch.Tensor:
    return SelectiveLinearFn.apply(x, weight, bias, split, split_dim, masks)


def elementwise_affine(x, weight, bias, allow: torch.Tensor | None) -> torch.Tensor:
    return ElementwiseAffineFn.apply(x, weight, bias, allow)


def grad_gate(y: torch.Tensor, allow: torch.Tensor | None) -> torch.Tensor:
    return y if allow is None else GradGateFn.apply(y, allow)


def mask_split_activation(h: torch.Tensor, feature_class: torch.Tensor, has_forget: bool,
                          masks: TokenMasks | None, ablated: torch.Tensor | None) -> torch.Tensor:
    """Forward masking of split activations ``h`` [B, S, F, ...] with per-feature classes [F].

    * retain-mode tokens: forget features are zero (sgtm, activation_masking);
    * gradient routing: on a forget:d token, features outside forget[d] pass no gradient;
    * ``ablated`` [F] bool: features of ablated domains are zero for every token.

    ``has_forget`` (this rank owns forget features in this layer) lets ranks and layers without
    any skip the retain-mode masking entirely."""
    extra = (1,) * (h.dim() - 3)
    is_forget = feature_class >= 0
    if ablated is not None:
        h = h.masked_fill(ablated.view(-1, *extra), 0.0)
    if masks is None:
        return h
    if masks.retain_tokens is not None and has_forget:
        off = masks.retain_tokens[:, :, None] & is_forget
        h = h.masked_fill(off.view(*off.shape, *extra), 0.0)
    if masks.route_domain is not None:
        route = masks.route_domain[:, :, None]
        stop = (route >= 0) & (feature_class != route)
        stop = stop.view(*stop.shape, *extra)
        h = torch.where(stop, h.detach(), h)
    return h
