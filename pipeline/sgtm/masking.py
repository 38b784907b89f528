"""Per-token selective gradient masking: the one place where masking happens.

Per batch, :meth:`TokenMasks.build` turns the mode tensor into a few [T, 1] tensors, once.
Per layer, three small autograd functions use them where gradients are *made*, so the
result is exact for any mix of modes in any micro-batch, on any rank, and works inside
DeepSpeed ZeRO (whose hooks take ``param.grad`` away before anyone could edit it):

* :class:`SelectiveLinearFn` - a split linear layer. The weight gradient is a sum over tokens of
  outer products, so the gradient of each slice (rows of a column-parallel weight, columns of a
  row-parallel one) is computed from the tokens allowed to update that slice's class, while the
  input gradient passed upstream stays the true one. Same matmuls as plain training, with the
  mask on the narrower operand, plus one small matmul per forget slice to redo its gradient from
  its own tokens.
* :class:`ElementwiseAffineFn` - ``x * weight + bias`` for norm gains/biases and the output
  biases of row-parallel layers, with per-token masking of the parameter gradients.
* :class:`GradGateFn` - identity forward, per-token gated backward; for embedding lookups,
  whose only gradient is the weight gradient.

Activation masking of the features a row-parallel layer consumes (retain-mode tokens switch
forget heads/units off; gradient routing's detach) happens inside :class:`SelectiveLinearFn` too,
through a per-layer :class:`InputFeatures` (contiguous column spans of each feature class, built
once) and per-batch [T, 1] token vectors (built once by :meth:`TokenMasks.build`): only the few
forget columns are touched, in place, and no [tokens x features] mask is ever materialised.
Ablation (features off for every token) is :func:`ablate_features`.

Which positions may read which in attention, and the mode a position is trained under when its
target crosses a mode boundary, are decided here too (:func:`position_modes`,
:func:`attention_masks`), once per batch in :meth:`TokenMasks.build`; docs/architecture.md
states the semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.codes import ALL_TOKENS, MAY_UPDATE, STRATEGIES, Mode, ParamClass, param_kind

IGNORE_INDEX = -100
CROSS_MODE_ATTENTION = ("segment", "detached_context")


def _spans(classes: list[int], width: int = 1) -> list[tuple[int, int, int]]:
    """Contiguous runs ``(class, start, stop)`` of a per-feature class list, in columns of ``width``."""
    runs, start = [], 0
    for i in range(1, len(classes) + 1):
        if i == len(classes) or classes[i] != classes[start]:
            runs.append((classes[start], start * width, i * width))
            start = i
    return runs


def select(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` [T, k] where ``keep`` [T, 1] (bool) holds, else 0: a selection, not a product, so a
    non-finite value at a dropped token (a forget position's bf16 overflow, a bad shard) stays out
    (0 x inf would be NaN). Every per-token mask in the pipeline goes through here."""
    return torch.where(keep, t, 0.0)


class FiniteFn(torch.autograd.Function):
    """Non-finite entries replaced by 0 in the forward, and in the backward's gradient too; saves
    nothing (a ``torch.where`` would keep its [T, width] condition alive until the backward)."""

    @staticmethod
    def forward(ctx, t):
        return torch.where(torch.isfinite(t), t, 0.0)

    @staticmethod
    def backward(ctx, g):
        return torch.where(torch.isfinite(g), g, 0.0)


def finite_only(t: torch.Tensor) -> torch.Tensor:
    """``t`` with non-finite entries replaced by 0. Attention mixes positions inside a fused
    kernel that multiplies masked probabilities by values, so a non-finite key/value at a forget
    position would reach every query; its inputs pass here. (A non-finite entry exists only at a
    forget position, whose forget gradient the non-finite policy then drops.)"""
    return FiniteFn.apply(t)


class FiniteGradFn(torch.autograd.Function):
    """Identity forward; the backward replaces non-finite gradient entries by 0: an attention
    output's gradient at a forget query, multiplied by that query's zero probabilities in the
    kernel's backward, must not turn the other positions' key/value gradients into NaN."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return torch.where(torch.isfinite(g), g, 0.0)


def check_modes(modes: torch.Tensor, n_domains: int, what: str = "modes") -> None:
    """A mode outside [0, FORGET + n_domains) would train nobody's parameters: refuse it."""
    lo, hi = (int(v) for v in torch.aminmax(modes))
    if lo < 0 or hi >= Mode.FORGET + n_domains:
        bad = lo if lo < 0 else hi
        raise ValueError(f"batch {what}: mode {bad} is outside [0, {Mode.FORGET + n_domains}) "
                         f"(0 unlabelled, 1 retain, 2..{Mode.FORGET + n_domains - 1} forget:<domain> "
                         f"for {n_domains} domain(s))")


def position_modes(modes: torch.Tensor, labels: torch.Tensor | None = None,
                   target_modes: torch.Tensor | None = None) -> torch.Tensor:
    """The mode each position is trained under (docs/architecture.md, "Isolation across mode
    boundaries"): a non-forget position whose *target* is a forget token predicts forget data, so
    it takes the target's forget mode. ``target_modes`` [B, S] is the mode of each label token
    (the loader sends it); without it the next position's mode is used, and the last position's
    target (outside the window) is assumed to share its own mode."""
    if target_modes is None:
        target_modes = torch.cat([modes[:, 1:], modes[:, -1:]], dim=1)
    to_forget = (modes < Mode.FORGET) & (target_modes >= Mode.FORGET)
    if labels is not None:
        to_forget &= labels != IGNORE_INDEX
    return torch.where(to_forget, target_modes, modes)


def attention_masks(pos_modes: torch.Tensor | None, doc_ids: torch.Tensor | None, cross_mode: str,
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(live, detached) [B, 1, S, S] bool masks of which keys each query reads (None: plain causal).

    Live: causal, same document, and a key whose features the query's mode may depend on: the
    same mode, or a retain-mode key for an unlabelled query. So non-forget positions never read
    forget positions (their outputs, hence retain gradients, cannot depend on forget content),
    forget queries never send gradient into non-forget positions, and a retain-mode position
    never reads features that forget parameters computed. Detached (``detached_context``): a
    forget query also reads earlier non-forget keys/values of its document, through detached
    copies, so forget spans keep their context without any gradient reaching non-forget data."""
    if cross_mode not in CROSS_MODE_ATTENTION:
        raise ValueError(f"sgtm.cross_mode_attention: expected one of {CROSS_MODE_ATTENTION}, got {cross_mode!r}")
    if pos_modes is None and doc_ids is None:
        return None, None
    ref = pos_modes if pos_modes is not None else doc_ids
    S = ref.shape[1]
    live = torch.ones(S, S, dtype=torch.bool, device=ref.device).tril()[None]
    if doc_ids is not None:
        live = live & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if pos_modes is None:
        return live[:, None], None
    q, k = pos_modes[:, :, None], pos_modes[:, None, :]
    causal_doc = live
    live = causal_doc & ((q == k) | ((q == Mode.UNLABELLED) & (k == Mode.RETAIN)))
    detached = None
    if cross_mode == "detached_context":
        detached = causal_doc & (q >= Mode.FORGET) & (k < Mode.FORGET)
    return live[:, None], (detached[:, None] if detached is not None else None)


@dataclass
class TokenMasks:
    """Everything the layers need to know about one batch's modes, built once per batch.

    ``allow[cls]`` is a [T, 1] bool tensor of which tokens may update parameters of slice class
    ``cls`` (None: every token may), read from :data:`pipeline.codes.MAY_UPDATE`.
    ``retain_keep`` [T, 1] is False on retain-mode tokens (their forget features are switched off
    in the forward); ``route_keep[cls]`` [T, 1] (gradient routing) is False on the tokens whose
    gradient may not flow through features of class ``cls`` (a missing class: every token's may).
    All are applied by :func:`select` (never multiplied).
    ``attn_live``/``attn_detached`` are the attention masks of :func:`attention_masks`.

    Token order: T is the flattened [B, S] of the batch, or [S, B] under sequence parallelism
    (``sequence_shard``), matching the layout of the activations the vectors multiply; ``local``
    then holds this rank's rows (its 1/world of the sequence, contiguous in [S, B] order) for the
    sequence-sharded regions (norms, row-parallel output biases)."""

    allow: dict[int, torch.Tensor | None]
    retain_keep: torch.Tensor | None = None
    route_keep: dict[int, torch.Tensor] | None = None
    attn_live: torch.Tensor | None = None
    attn_detached: torch.Tensor | None = None
    local: TokenMasks | None = None

    @property
    def isolating(self) -> bool:
        """Modes were given under a masking strategy: positions must not reach one another."""
        return self.retain_keep is not None or self.route_keep is not None

    @staticmethod
    def build(modes: torch.Tensor | None, strategy: str, n_domains: int, *, labels: torch.Tensor | None = None,
              target_modes: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
              cross_mode: str = "segment", sequence_shard: tuple[int, int] | None = None) -> TokenMasks:
        """``sequence_shard``: (rank, world) of the sequence-parallel group, or None."""
        masks = TokenMasks._build(modes, strategy, n_domains, labels, target_modes, doc_ids, cross_mode,
                                  seq_first=sequence_shard is not None)
        if sequence_shard is not None:
            rank, world = sequence_shard
            ref = modes if modes is not None else doc_ids
            n = 0 if ref is None else ref.shape[0] * (ref.shape[1] // world)
            masks.local = masks._rows(rank * n, (rank + 1) * n)
        return masks

    def _rows(self, start: int, stop: int) -> TokenMasks:
        """The token vectors' rows [start, stop) (views; a tensor shared by several classes stays
        shared, as :meth:`FeatureSplit.weight_grads` relies on)."""
        cut: dict[int, torch.Tensor] = {}

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in cut:
                cut[id(t)] = t[start:stop]
            return cut[id(t)]

        route = None if self.route_keep is None else {c: rows(t) for c, t in self.route_keep.items()}
        return TokenMasks({c: rows(t) for c, t in self.allow.items()}, rows(self.retain_keep), route)

    @staticmethod
    def _build(modes, strategy, n_domains, labels, target_modes, doc_ids, cross_mode,
               seq_first: bool) -> TokenMasks:
        if strategy not in STRATEGIES:
            raise ValueError(f"sgtm.strategy: expected one of {STRATEGIES}, got {strategy!r}")
        classes = [ParamClass.RETAIN, ParamClass.JOINT_NON_FORGET, ParamClass.JOINT_ALL, *range(n_domains)]
        allow: dict[int, torch.Tensor | None] = {int(c): None for c in classes}
        if modes is None or strategy == "none":
            live, _ = attention_masks(None, doc_ids, cross_mode)
            return TokenMasks(allow, attn_live=live)
        check_modes(modes, n_domains)
        if target_modes is not None:
            check_modes(target_modes, n_domains, "target_modes")
        pos = position_modes(modes, labels, target_modes)
        live, detached = attention_masks(pos, doc_ids, cross_mode)
        flat = (pos.t() if seq_first else pos).reshape(-1, 1)
        token_kind = {"unlabelled": flat == Mode.UNLABELLED, "retain": flat == Mode.RETAIN}
        rules = MAY_UPDATE[strategy]
        cache: dict[tuple, torch.Tensor | None] = {}
        for c in classes:
            kinds = set(rules[param_kind(int(c))])
            if c >= 0 and n_domains == 1:
                kinds.add("other_forget")  # no other domain's tokens exist
            if c < 0 and kinds & {"own_forget", "other_forget"}:
                kinds |= {"own_forget", "other_forget"}  # a non-forget class has no own domain
            key = (frozenset(kinds), int(c) if "own_forget" in kinds and c >= 0 else None)
            if key not in cache:
                if frozenset(kinds) == ALL_TOKENS:
                    cache[key] = None
                else:
                    m = torch.zeros_like(flat, dtype=torch.bool)
                    for kind in kinds & {"unlabelled", "retain"}:
                        m |= token_kind[kind]
                    if "own_forget" in kinds:
                        m |= (flat == Mode.FORGET + c) if c >= 0 else flat >= Mode.FORGET
                    if "other_forget" in kinds and c >= 0:
                        m |= (flat >= Mode.FORGET) & (flat != Mode.FORGET + c)
                    cache[key] = m
            allow[int(c)] = cache[key]
        if strategy == "gradient_routing":
            # On a forget:d token, features outside forget[d] pass no gradient.
            non_forget = flat < Mode.FORGET
            route = {int(ParamClass.RETAIN): non_forget}
            if n_domains > 1:
                route.update({d: non_forget | (flat == Mode.FORGET + d) for d in range(n_domains)})
            return TokenMasks(allow, None, route, live, detached)
        retain_keep = flat != Mode.RETAIN
        return TokenMasks(allow, retain_keep, None, live, detached)


class FeatureSplit:
    """The slice classes along the split side of one linear layer, grouped for fast masking.

    The most frequent class (normally retain) is the base, masked for the whole weight at once;
    the other classes (the few forget features) are kept as contiguous spans and recomputed."""

    def __init__(self, feature_class: torch.Tensor):
        classes, counts = torch.unique(feature_class, return_counts=True)
        self.base = int(classes[counts.argmax()])
        flat = [int(c) for c in feature_class.reshape(-1).tolist()]
        self.spans = [(c, s, e) for c, s, e in _spans(flat) if c != self.base] if len(flat) > 1 else []

    def weight_grads(self, g: torch.Tensor, xs: torch.Tensor, split_dim: int, allow: dict[int, torch.Tensor | None],
                     want_w: bool, want_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """dW = sum over tokens of g_t x_t^T, each slice summed only over the tokens allowed to
        update its class (``g`` [T, out], ``xs`` [T, in]; the bias follows the output rows).

        The base class's tokens are selected on both operands of one full-size matmul (selecting
        one would leave 0 x inf = NaN where the other is non-finite at a dropped token); the few
        other slices (forget rows or columns) are then recomputed from their own tokens."""
        a = allow[self.base]
        if a is None:
            gb, xb = g, xs
        else:  # both operands: the other one may hold a non-finite value at a dropped token
            gb, xb = select(g, a), select(xs, a)
        grad_w = gb.t().matmul(xb) if want_w else None
        grad_b = gb.sum(0) if want_b else None
        for cls, s, e in self.spans:
            c = allow[cls]
            if c is a:  # same token set as the base: already right
                continue
            if split_dim == 0:
                gs = g[:, s:e] if c is None else select(g[:, s:e], c)
                if grad_w is not None:
                    grad_w[s:e] = gs.t().matmul(xs if c is None else select(xs, c))
                if grad_b is not None:
                    grad_b[s:e] = gs.sum(0)
            elif grad_w is not None:
                xsl = xs[:, s:e] if c is None else select(xs[:, s:e], c)
                grad_w[:, s:e] = (g if c is None else select(g, c)).t().matmul(xsl)
        return grad_w, grad_b


class InputFeatures:
    """The feature classes of a row-parallel layer's input columns (heads x head_dim, or MLP
    units), as contiguous column spans: what the forward activation masking touches."""

    def __init__(self, feature_class: torch.Tensor, width: int = 1):
        flat = [int(c) for c in feature_class.reshape(-1).tolist()]
        self.spans = _spans(flat, width)
        self.forget_spans = [(c, s, e) for c, s, e in self.spans if c >= 0]
        self.has_forget = bool(self.forget_spans)


def _gate_input_grad(gi: torch.Tensor, features: InputFeatures, masks: TokenMasks) -> None:
    """In place on a fresh [T, K] input gradient: the entries the forward switched off (retain
    tokens x forget columns) get no gradient; gradient routing's stops likewise."""
    if masks.retain_keep is not None:
        for _, s, e in features.forget_spans:
            gi[:, s:e] = select(gi[:, s:e], masks.retain_keep)
    route = masks.route_keep
    if route is not None:
        base = route.get(int(ParamClass.RETAIN))
        own = [(s, e, gi[:, s:e].clone(), route.get(c)) for c, s, e in features.forget_spans]
        if base is not None:
            gi.copy_(select(gi, base))
        for s, e, sub, keep in own:
            gi[:, s:e] = sub if keep is None else select(sub, keep)


class SelectiveLinearFn(torch.autograd.Function):
    """y = x W^T + b with per-token, per-slice weight gradients and an exact input gradient.

    ``split_dim`` 0: classes are on output rows (column-parallel), masking the output gradient.
    ``split_dim`` 1: classes are on input columns (row-parallel), masking the saved input; with
    ``features`` the input's forget columns are also switched off on retain-mode tokens (in
    place on ``x``, which must be a fresh activation no other op saved: the caller's GELU/SwiGLU
    output or attention output after the head merge), and the input gradient of switched-off or
    routed entries is zeroed. When ``x`` was edited in place it is also returned (marked dirty)
    as a second output; :func:`selective_linear` drops it."""

    @staticmethod
    def forward(ctx, x, weight, bias, split: FeatureSplit | None, split_dim: int, masks: TokenMasks | None,
                features: InputFeatures | None = None):
        ctx.set_materialize_grads(False)
        off = features is not None and masks is not None and features.has_forget and masks.retain_keep is not None
        routed = features is not None and masks is not None and masks.route_keep is not None
        dirty = False
        if off:
            if x._is_view() or not x.is_contiguous():  # never edit a tensor someone else may hold
                x = x.clone(memory_format=torch.contiguous_format)
            else:
                ctx.mark_dirty(x)
                dirty = True
            x2 = x.view(-1, x.shape[-1])
            for _, s, e in features.forget_spans:
                x2[:, s:e] = select(x2[:, s:e], masks.retain_keep)
        ctx.save_for_backward(x, weight)
        ctx.split, ctx.split_dim, ctx.masks, ctx.has_bias = split, split_dim, masks, bias is not None
        ctx.features = features if (off or routed) else None
        y = F.linear(x, weight, bias)
        return (y, x) if dirty else y

    @staticmethod
    def backward(ctx, grad_out, *grad_x_after):
        x, weight = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        grad_in = None
        if ctx.needs_input_grad[0]:
            grad_in = grad_out.matmul(weight)
            if grad_x_after and grad_x_after[0] is not None:
                grad_in = grad_in + grad_x_after[0]
            if ctx.features is not None:
                _gate_input_grad(grad_in.view(-1, grad_in.shape[-1]), ctx.features, ctx.masks)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.split is not None and ctx.masks is not None:
            grad_w, grad_b = ctx.split.weight_grads(g, xs, ctx.split_dim, ctx.masks.allow, want_w, want_b)
        else:
            grad_w = g.t().matmul(xs) if want_w else None
            grad_b = g.sum(0) if want_b else None
        return grad_in, grad_w, grad_b, None, None, None, None


class ElementwiseAffineFn(torch.autograd.Function):
    """y = x * weight + bias (weight/bias over the last dim, either may be None), with the
    parameter gradients summed only over the tokens ``allow`` [T, 1] selects."""

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
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            gx = g * x.reshape(-1, x.shape[-1])
            grad_w = (gx if allow is None else select(gx, allow)).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = (g if allow is None else select(g, allow)).sum(0)
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
        return select(grad_out.reshape(-1, shape[-1]), allow).reshape(shape), None


def selective_linear(x, weight, bias, split: FeatureSplit | None, split_dim: int,
                     masks: TokenMasks | None, features: InputFeatures | None = None) -> torch.Tensor:
    out = SelectiveLinearFn.apply(x, weight, bias, split, split_dim, masks, features)
    return out[0] if isinstance(out, tuple) else out


def elementwise_affine(x, weight, bias, allow: torch.Tensor | None) -> torch.Tensor:
    return ElementwiseAffineFn.apply(x, weight, bias, allow)


def grad_gate(y: torch.Tensor, allow: torch.Tensor | None) -> torch.Tensor:
    return y if allow is None else GradGateFn.apply(y, allow)


def ablate_features(h: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Split activations ``h`` [B, S, F, ...] with the features of ablated domains (``ablated``
    [F] bool) zero for every token, out of place. The per-token masking happens inside
    :class:`SelectiveLinearFn`."""
    extra = (1,) * (h.dim() - 3)
    return h.masked_fill(ablated.view(-1, *extra), 0.0)
