"""Mixture-of-experts MLP with forget experts and expert parallelism (issue #15).

Why not megatron-core's ``MoELayer``: megatron-core 0.16.1's MoE cannot run on a CPU-only torch
(``TopKRouter.gating`` moves its weight to ``torch.cuda.current_device()`` when it is on the CPU,
``MoEAlltoAllTokenDispatcher.__init__`` creates a ``torch.cuda.Stream()``, and the uneven
all-to-all of ``tensor_parallel.mappings.all_to_all`` allocates its output on
``torch.cuda.current_device()``), and its experts have no place to mask weight gradients per
token. So this is the minimal equivalent on megatron-core's ``parallel_state`` expert groups:
megatron's EP group (``get_expert_model_parallel_group``), its split/gather mappings on that group,
and an explicit all-to-all dispatch (``all_to_all_single``, uneven splits, which gloo runs).

Layout. The EP ranks of a group share their batch, like TP ranks (the EP group is nested with the
TP group, ``engine.expert_parallel``; the groups are :mod:`pipeline.backend.distributed`'s);
DeepSpeed's data-parallel group is the ranks with other data
(:func:`~pipeline.backend.distributed.data_parallel_group`). Every rank runs the router on every
token of the micro-batch (cheap: tokens x experts), so routing, capacity drops and the auxiliary
loss are the same numbers at any EP size. Then each EP rank takes its 1/EP of the tokens
(megatron's ``scatter_to_sequence_parallel_region`` on the EP group: forward split, backward
all-gather),
sends each (token, expert) assignment to the rank owning that expert (all-to-all), runs its local
experts, sends the outputs back (all-to-all), weights them by the router and gathers the tokens
back (``gather_from_sequence_parallel_region``, backward split, since what follows is replicated).

SGTM (docs/architecture.md, "Mixture of experts"). Expert weights are whole-tensor classes
(forget[d] for the domain's experts, retain for the others), the router is joint
(``sgtm.joint_update``), shared experts are the dense MLP (split into units, forget units allowed).
Masking goes through the one mode tensor and the one autograd function: each assignment carries
its token's ``TokenMasks.allow`` entry for its expert's class (as a row kind) through the
all-to-all, and the expert's matmuls are :func:`selective_linear`, the refused rows with an
all-zero allow vector (:meth:`MoE._run_local` says why the rows are batched by kind). Routing: retain-mode tokens
(``retain_keep`` 0) have the forget experts' logits at -inf; forget and unlabelled tokens route
freely; ablated experts are -inf for every token. Capacity is filled by non-forget tokens first,
so which non-forget tokens are dropped never depends on forget tokens, and the auxiliary loss is
computed over non-forget tokens only (``allow[JOINT_NON_FORGET]``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from torch import nn

from pipeline.backend.distributed import ep_world
from pipeline.codes import ParamClass
from pipeline.config import ModelConfig
from pipeline.model.layers import SplitFeatures
from pipeline.model.shapes import active_params, num_params
from pipeline.sgtm.masking import FeatureSplit, TokenMasks, select, selective_linear
from pipeline.sgtm.partition import ForgetPartition, ParamRole

# ---- all-to-all -------------------------------------------------------------------------------


class _AllToAllV(torch.autograd.Function):
    """Uneven all-to-all along dim 0 (megatron's ``_AllToAll`` allocates on CUDA for uneven
    splits); the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _AllToAllV.apply(g.contiguous(), in_splits, out_splits, ctx.group), None, None, None


# ---- roles -----------------------------------------------------------------------------------


def _joint(policy: str) -> int:
    return int(ParamClass.JOINT_ALL if policy == "all" else ParamClass.JOINT_NON_FORGET)


def expert_role(part: ForgetPartition, kind: str, layer: int, expert: int) -> ParamRole:
    """A routed expert's tensor: the whole tensor has the expert's class (forget[d] or retain)."""
    return ParamRole(kind, layer, None, part.expert_class(layer)[expert:expert + 1].clone())


def router_role(part: ForgetPartition, layer: int) -> ParamRole:
    """The router is joint: forget tokens update it only under ``sgtm.joint_update: all``."""
    return ParamRole("router", layer, None, torch.tensor([_joint(part.sgtm.joint_update)]))


def _tag(p: nn.Parameter, role: ParamRole, expert: int | None = None) -> None:
    p.sgtm_role = role
    if expert is not None:
        p.expert_parallel = True  # read by the clipper (backend.distributed.counts_once) and the EP gather
        p.expert_index = expert


class Expert(nn.Module):
    """One routed expert: the dense MLP's shape (SwiGLU rows [gate; up], or GELU) at width d_ff."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, bias: bool):
        super().__init__()
        self.w_in = nn.Parameter(w_in)
        self.w_out = nn.Parameter(w_out)
        self.b_in = nn.Parameter(torch.zeros(w_in.shape[0])) if bias else None
        self.b_out = nn.Parameter(torch.zeros(w_out.shape[0])) if bias else None


class MoE(SplitFeatures):
    """Routed experts (EP-sharded) + optional shared experts; used as ``Block.mlp``.

    ``feature_class`` (SplitFeatures) is the class of every global expert, so ablation
    (``set_ablated``) switches whole experts off: their router logits are -inf for every token."""

    def __init__(self, cfg, part: ForgetPartition, layer: int, tp_rank: int, mpc, init, out_init,
                 shared_mlp: Callable[[ModelConfig], nn.Module]):
        """``shared_mlp(cfg)`` builds the dense MLP of the shared experts (the Transformer's
        ``MLP`` at ``cfg``), after the router and the routed experts have drawn their weights."""
        super().__init__()
        E, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.ep_rank, self.ep_size = ep_world()
        if E % self.ep_size:
            raise ValueError(f"engine.expert_parallel: {self.ep_size} does not divide model.n_experts={E}")
        if self.ep_size > 1:
            from pipeline.model.cpu_compat import patch_sequence_parallel_mappings

            patch_sequence_parallel_mappings()  # megatron's gather allocates on CUDA; a no-op with CUDA
        self.n_experts, self.top_k, self.n_local = E, cfg.moe_top_k, E // self.ep_size
        self.first = self.ep_rank * self.n_local
        self.swiglu = cfg.mlp == "swiglu"
        self.capacity_factor, self.drop_policy = cfg.moe_capacity_factor, cfg.moe_drop_policy
        self.aux_coef = cfg.moe_aux_loss_coef
        self.own_first = part.sgtm.moe_forget_routing == "own_first" and part.sgtm.strategy == "sgtm"
        classes = part.expert_class(layer)
        self._init_features(classes)
        self.register_buffer("forget_expert", classes >= 0, persistent=False)
        self.router = nn.Parameter(torch.empty(E, d))
        init(self.router)
        _tag(self.router, router_role(part, layer))
        self.router_split = FeatureSplit(self.router.sgtm_role.classes)
        # Every rank draws every expert in order and keeps its own: the logical model (and the
        # RNG stream the next layers draw from) is the same at any EP size.
        experts = []
        for e in range(E):
            w_in, w_out = torch.empty(2 * f if self.swiglu else f, d), torch.empty(d, f)
            init(w_in)
            out_init(w_out)
            if self.first <= e < self.first + self.n_local:
                experts.append(Expert(w_in, w_out, bool(cfg.bias)))
        self.experts = nn.ModuleList(experts)
        self.splits = []
        for j, ex in enumerate(self.experts):
            e = self.first + j
            for name, kind in (("w_in", "expert_in"), ("b_in", "expert_in"), ("w_out", "expert_out"),
                               ("b_out", "expert_out")):
                if getattr(ex, name) is not None:
                    _tag(getattr(ex, name), expert_role(part, kind, layer, e), e)
            self.splits.append(FeatureSplit(classes[e:e + 1]))
        self.local_classes = [int(c) for c in classes[self.first:self.first + self.n_local]]
        self.shared = None
        if cfg.moe_shared_experts:
            self.shared = shared_mlp(dataclasses.replace(cfg, d_ff=cfg.mlp_units))
        self.aux_loss: torch.Tensor | None = None

    # ---- routing -----------------------------------------------------------------------------

    def _blocked(self, masks: TokenMasks | None, T: int) -> torch.Tensor | None:
        """[T, E] True where a token may not route: forget experts for retain-mode tokens, ablated
        experts for everyone."""
        blocked = None
        if masks is not None and masks.retain_keep is not None and self.has_forget:
            blocked = ~masks.retain_keep & self.forget_expert[None]
        if self.ablated is not None:
            off = self.ablated[None].expand(T, -1)
            blocked = off if blocked is None else blocked | off
        return blocked

    def _route(self, probs: torch.Tensor, masks: TokenMasks | None, nonforget: torch.Tensor | None,
               blocked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (probabilities, experts) per token, highest first. ``sgtm.moe_forget_routing:
        own_first``: a forget:d token takes domain d's (unablated) forget experts first. Its domain
        is read from the allow vectors: under sgtm, forget[d] admits non-forget tokens and forget:d
        tokens only (every forget token when there is one domain)."""
        if not (self.own_first and self.has_forget and masks is not None and nonforget is not None):
            return probs.topk(self.top_k, dim=-1)
        forget_tok = ~nonforget  # [T, 1]
        cols = []
        for c in self.feature_class.tolist():
            a = masks.allow.get(int(c)) if c >= 0 else None
            cols.append(torch.zeros_like(forget_tok) if c < 0 else forget_tok if a is None else forget_tok & a)
        own = torch.cat(cols, dim=1)  # [T, E]
        if blocked is not None:
            own &= ~blocked
        _, top_e = (probs + 2.0 * own).topk(self.top_k, dim=-1)  # probabilities are <= 1: own experts first
        return probs.gather(1, top_e), top_e

    def _capacity(self, top_p: torch.Tensor, top_e: torch.Tensor,
                  nonforget: torch.Tensor | None) -> torch.Tensor | None:
        """[T, k] which assignments an expert takes: per expert, the first ceil(cf * T * k / E)
        in priority order (non-forget tokens first, then higher probability / earlier token)."""
        if self.capacity_factor is None:
            return None
        T, k = top_e.shape
        cap = math.ceil(self.capacity_factor * T * k / self.n_experts)
        n = T * k
        if self.drop_policy == "probs":
            order = torch.sort(top_p.detach().reshape(-1), descending=True, stable=True).indices
        else:
            order = torch.arange(n, device=top_e.device)
        if nonforget is not None:
            late = (~nonforget.reshape(-1)).repeat_interleave(k)[order]
            order = order[torch.sort(late.to(torch.uint8), stable=True).indices]
        onehot = F.one_hot(top_e.reshape(-1)[order], self.n_experts)
        slot = (onehot.cumsum(0) * onehot).sum(1) - 1
        keep = torch.empty(n, dtype=torch.bool, device=top_e.device)
        keep[order] = slot < cap
        return keep.view(T, k)

    def _aux(self, probs: torch.Tensor, top_e: torch.Tensor, nonforget: torch.Tensor | None) -> torch.Tensor:
        """Switch-style load balancing, E * sum_e f_e * P_e, over non-forget tokens only: neither
        its value nor its gradient depends on forget tokens."""
        T = probs.shape[0]
        n = torch.tensor(T, dtype=probs.dtype, device=probs.device) if nonforget is None \
            else nonforget.sum().to(probs.dtype).clamp(min=1)
        routed = torch.zeros_like(probs).scatter(1, top_e, 1.0)
        if nonforget is not None:  # selected, so a non-finite forget router output stays out
            routed, probs = select(routed, nonforget), select(probs, nonforget)
        f = routed.sum(0) / (n * self.top_k)
        P = probs.sum(0) / n
        return self.aux_coef * self.n_experts * (f.detach() * P).sum()

    def _kind(self, masks: TokenMasks | None, nonforget: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """[T, E] row kind of token t at expert e (see :meth:`_run_local`): 0 non-forget token,
        1 forget token allowed to update e's class, 2 not allowed; from the mode tensor's allow
        vectors (``TokenMasks.allow``). None: every token is kind 0 (no modes, strategy none)."""
        if masks is None:
            return None
        cols = [masks.allow.get(int(c)) for c in self.feature_class.tolist()]
        if nonforget is None and all(c is None for c in cols):
            return None
        one = torch.ones(T, 1, device=self.router.device)
        allow = torch.cat([one if c is None else c.float() for c in cols], dim=1)  # [T, E]
        forget = torch.zeros(T, 1, device=self.router.device) if nonforget is None else (~nonforget).float()
        return (forget * (1 + (allow == 0).float())).long()

    # ---- experts -----------------------------------------------------------------------------

    def _expert(self, j: int, h: torch.Tensor, allow: torch.Tensor | None) -> torch.Tensor:
        ex, split = self.experts[j], self.splits[j]
        m = None if allow is None else TokenMasks({self.local_classes[j]: allow})
        u = selective_linear(h, ex.w_in, ex.b_in, split, 0, m)
        if self.swiglu:
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u)
        return selective_linear(u, ex.w_out, ex.b_out, split, 1, m)

    def _run_local(self, rows: torch.Tensor, local: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """Rows [M, d] for local experts ``local`` [M] -> outputs [M, d], same order.

        ``kind`` [M] sorts each expert's rows into up to three batches: 0 non-forget tokens, 1
        forget tokens that may update the expert's class, 2 tokens that may not (their batch goes
        through the same :func:`selective_linear` with an all-zero allow vector, so it adds nothing
        to the weight gradient). Why batches and not one masked matmul: a matmul's reduction
        order can depend on its row count, which forget routing changes; so non-forget outputs
        and a retain expert's weight gradient come from batches of non-forget rows only, in token
        order, and are bit-identical whatever the forget tokens did. Every local expert runs
        (maybe on no rows), so every expert parameter gets a gradient."""
        key = local * 3 + kind
        order = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=3 * self.n_local).tolist()
        xs = rows[order].split(counts)
        outs = []
        for j in range(self.n_local):
            outs.append(self._expert(j, xs[3 * j], None))
            if counts[3 * j + 1]:
                outs.append(self._expert(j, xs[3 * j + 1], None))
            if counts[3 * j + 2]:
                outs.append(self._expert(j, xs[3 * j + 2], rows.new_zeros(counts[3 * j + 2], 1, dtype=torch.bool)))
        out = torch.cat(outs)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        return out[inv]

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, masks: TokenMasks | None) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # token order = the masks' order
        T = xf.shape[0]
        logits = selective_linear(xf, self.router, None, self.router_split, 0, masks).float()
        blocked = self._blocked(masks, T)
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        probs = logits.softmax(-1)
        nonforget = None if masks is None else masks.allow.get(int(ParamClass.JOINT_NON_FORGET))
        top_p, top_e = self._route(probs, masks, nonforget, blocked)
        weights = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        self.aux_loss = self._aux(probs, top_e, nonforget) if self.training and self.aux_coef > 0 else None
        keep = self._capacity(top_p, top_e, nonforget)
        kind = self._kind(masks, nonforget, T)
        y = self._dispatch(xf, weights, top_e, keep, kind).view(shape)
        if self.shared is not None:
            y = y + self.shared(x, masks)
        return y

    def _dispatch(self, xf, weights, top_e, keep, kind) -> torch.Tensor:
        T, d = xf.shape
        k, ep = self.top_k, self.ep_size
        group = ps.get_expert_model_parallel_group() if ep > 1 else None
        if ep > 1:
            if T % ep:
                raise ValueError(f"engine.expert_parallel: {T} tokens in the micro-batch are not divisible by {ep} "
                                 f"EP ranks (micro_batch_size x sequence length must be)")
            lo, hi = self.ep_rank * (T // ep), (self.ep_rank + 1) * (T // ep)
            x_loc = scatter_to_sequence_parallel_region(xf, group=group)
            w_loc = scatter_to_sequence_parallel_region(weights, group=group)
            top_e, keep = top_e[lo:hi], None if keep is None else keep[lo:hi]
            kind = None if kind is None else kind[lo:hi]
        else:
            x_loc, w_loc = xf, weights
        Tl = x_loc.shape[0]
        dev = xf.device
        tok = torch.arange(Tl, device=dev).repeat_interleave(k)
        slot = torch.arange(k, device=dev).repeat(Tl)
        exp = top_e.reshape(-1)
        if keep is not None:
            sel = keep.reshape(-1)
            tok, slot, exp = tok[sel], slot[sel], exp[sel]
        order = torch.sort(exp, stable=True).indices
        tok, slot, exp = tok[order], slot[order], exp[order]
        kd = torch.zeros_like(exp) if kind is None else kind[tok, exp]
        send = x_loc[tok]
        if ep > 1:
            sc_t = torch.bincount(exp // self.n_local, minlength=ep)
            rc_t = torch.empty_like(sc_t)
            dist.all_to_all_single(rc_t, sc_t, group=group)
            sc, rc = sc_t.tolist(), rc_t.tolist()
            recv = _AllToAllV.apply(send, rc, sc, group)
            meta = torch.stack([exp, kd], 1)
            rmeta = meta.new_empty((sum(rc), 2))
            dist.all_to_all_single(rmeta, meta, rc, sc, group=group)
            out = _AllToAllV.apply(self._run_local(recv, rmeta[:, 0] - self.first, rmeta[:, 1]), sc, rc, group)
        else:
            out = self._run_local(send, exp - self.first, kd)
        y = torch.zeros(Tl, d, dtype=xf.dtype, device=dev).index_add(0, tok, out * w_loc[tok, slot][:, None])
        if ep > 1:
            y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False, group=group)
        return y


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE layers' auxiliary losses from the last (training) forward, or None."""
    parts = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    return torch.stack(parts).sum() if parts else None


# ---- state across EP ranks --------------------------------------------------------------------


def gather_full_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """The TP=1, EP=1 view of the model's parameters (or gradients) on every rank: the TP gather
    of :mod:`pipeline.model.tp_state`, then every expert from its EP rank, under its global index."""
    from pipeline.model.tp_state import gather_full_state_dict as gather_tp

    out = gather_tp(model, grads)
    _, ep = ep_world()
    if ep == 1:
        return out
    group = ps.get_expert_model_parallel_group()
    for name, p in model.named_parameters():
        if not getattr(p, "expert_parallel", False):
            continue
        del out[name]
        t = (p.grad if grads else p).detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(ep)]
        dist.all_gather(parts, t, group=group)
        idx = [None] * ep
        dist.all_gather_object(idx, int(p.expert_index), group=group)
        head, _, tail = name.partition(".experts.")
        rest = tail.split(".", 1)[1]
        for r in range(ep):
            out[f"{head}.experts.{idx[r]}.{rest}"] = parts[r].cpu().clone()
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a TP=1/EP=1 state into this rank's shards (experts by global index)."""
    from pipeline.model.tp_state import load_full_state_dict as load_tp

    local = {}
    for name, p in model.named_parameters():
        if getattr(p, "expert_parallel", False):
            head, _, tail = name.partition(".experts.")
            local[name] = state[f"{head}.experts.{p.expert_index}.{tail.split('.', 1)[1]}"]
        elif name in state:
            local[name] = state[name]
    load_tp(model, local)


# ---- reporting ----------------------------------------------------------------------------------


def expert_ownership(part: ForgetPartition, ep: int) -> list[dict]:
    """Per EP rank: its global experts and, per domain, the forget experts it holds per block."""
    E = part.model.n_experts
    n = E // ep
    out = []
    for r in range(ep):
        mine = range(r * n, (r + 1) * n)
        owned = {}
        for d, name in enumerate(part.domains):
            per = {layer: [e for e in part.experts(layer, d) if e in mine] for layer in range(part.model.n_layers)}
            owned[name] = {layer: es for layer, es in per.items() if es}
        out.append({"rank": r, "experts": list(mine), "owned": owned})
    return out


def describe(part: ForgetPartition, ep: int) -> str:
    """Lines for ``sgtm partition``: which experts each domain owns on which EP rank."""
    m = part.model
    active = active_params(m)
    lines = [f"MoE: {m.n_experts} routed experts (top {m.moe_top_k}, d_ff {m.d_ff} each), "
             f"{m.moe_shared_experts} shared (forget units index their {m.mlp_units} units); router "
             f"{'joint(all)' if part.sgtm.joint_update == 'all' else 'joint(non_forget)'}; EP={ep}; "
             f"{active / 1e6:.2f}M parameters active per token of {num_params(m) / 1e6:.2f}M"]
    for row in expert_ownership(part, ep):
        r, es = row["rank"], row["experts"]
        parts = []
        for name, per in row["owned"].items():
            if per:
                blocks = sorted(per)
                parts.append(f"{name}: experts {sorted({e for v in per.values() for e in v})} in blocks {blocks}")
        lines.append(f"EP rank {r} (experts {es[0]}-{es[-1]}): " + ("; ".join(parts) if parts
                                                                    else "no forget experts"))
    return "\n".join(lines)
