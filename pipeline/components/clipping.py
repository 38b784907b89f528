"""Gradient clipping per partition: each group of parameters is clipped by its own norm.

Global-norm clipping would let forget-labelled data shrink the retain update of the same step,
breaking isolation. The groups (:func:`clip_group`, the one mapping from slice class to group):

* retain + joint(non_forget): forget-mode tokens never reach these, so neither their gradient
  nor its norm (and so the group's clip coefficient) depends on forget data;
* forget[d], one group per domain;
* joint(all) (``sgtm.embedding_update: all`` / ``sgtm.joint_update: all``): every token updates
  these, forget tokens included, so they get their own group; sharing the retain group's norm
  would let the size of a forget gradient set the retain coefficient.

The group ids are :class:`pipeline.codes.ClipGroup` (:func:`pipeline.codes.clip_group`
maps a slice class to its group). A group no parameter belongs to (joint(all) under the
``non_forget`` policies) is left out of the norms.

Norms are computed over all ranks (TP-replicated parameters, and the copies of replicated KV
heads, counted once).

Where the gradients are differs by engine setup:
* ZeRO-0 fp32: in ``param.grad`` after the boundary backward; :meth:`clip_param_grads` runs
  before ``engine.step()``.
* ZeRO-1/2: in DeepSpeed's gradient partition; :meth:`clip_zero_partition` runs inside the
  optimizer step, before DeepSpeed reads them (both through
  :mod:`pipeline.backend.deepspeed_internals`). DeepSpeed's own clipping stays off
  (``gradient_clipping: 0``).

:attr:`PartitionClipper.runs` counts the clips, so the train step can check that the clip ran.

The same groups decide what a non-finite gradient does (:meth:`PartitionClipper.nonfinite_groups`,
docs/architecture.md "Non-finite gradients"): a forget group's non-finite gradient is dropped
(selected to zero) and the other groups' update goes on, so forget data can neither poison nor
stop the retain update; a non-finite retain or joint(all) group skips the whole step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pipeline.backend import deepspeed_internals as dsi
from pipeline.backend.distributed import counts_once, data_parallel_rank_size
from pipeline.codes import ClipGroup, clip_group
from pipeline.model.tp_state import replica_copy_rows


def group_name(group: int) -> str:
    """Name of a clip group in the metrics (``grad_norm_<name>``)."""
    if group == ClipGroup.RETAIN:
        return "retain"
    if group == ClipGroup.JOINT_ALL:
        return "joint_all"
    return f"forget{group - ClipGroup.FORGET}"


def reduce_over_pipeline(sq: torch.Tensor) -> None:
    """Sum the per-group squared norms over the pipeline stages."""
    dist.all_reduce(sq, group=ps.get_pipeline_model_parallel_group())


def _groups_on_any_stage(groups: list[int], n: int, device: torch.device) -> list[int]:
    """The clip groups some rank has parameters of (one MAX all-reduce), so every stage indexes
    the same groups (joint(all) embeddings, say, live on the first stage only)."""
    flags = torch.zeros(n, device=device)
    flags[groups] = 1.0
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [int(g) for g in flags.nonzero().flatten().tolist()]


class PartitionClipper:
    """Clips each group by its own norm; :attr:`runs` counts the clips (one per applied step)."""

    def __init__(self, model: torch.nn.Module, n_domains: int, max_norm: float, device: torch.device):
        self.max_norm = max_norm
        self.device = device
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The groups that have parameters, in id order; norms and coefficients are indexed like
        # this list. Every forget group is listed (a rank may hold none of a domain's heads);
        # the non-forget classes are on every TP rank (embeddings, norms), so ranks agree.
        present = {int(clip_group(c)) for p in self.params for c in p.sgtm_role.classes.unique().tolist()}
        self.groups = sorted(present | {int(ClipGroup.RETAIN)} | {int(ClipGroup.FORGET) + d for d in range(n_domains)})
        if ps.get_pipeline_model_parallel_world_size() > 1:  # stages hold different parameters: agree
            self.groups = _groups_on_any_stage(self.groups, int(ClipGroup.FORGET) + n_domains, device)
        self.n_groups = len(self.groups)
        self.last_norms: torch.Tensor | None = None  # per entry of ``groups``, before clipping
        self.last_coefficients: torch.Tensor | None = None  # per entry of ``groups``, <= 1
        self.runs = 0
        self._groups: dict[int, torch.Tensor] = {}
        self._fragment_groups: dict[tuple[int, int, int], torch.Tensor] = {}
        self._count_masks: dict[int, torch.Tensor | None] = {}

    uses_zero_partition = False

    # -- shared ----------------------------------------------------------------------------

    def _counts(self, p: torch.Tensor) -> bool | torch.Tensor:
        """Replicated parameters are counted on TP rank 0 only; replicated K/V rows of a sharded
        QKV (n_kv_heads < TP) on the first rank holding each copy only: a flat bool per element.
        Expert parallelism: each expert, and each replicated parameter, on one rank of its copies."""
        once = counts_once(p)
        if once is not None:
            return once
        if not getattr(p, "tensor_model_parallel", False):
            return self.tp_rank == 0
        if id(p) not in self._count_masks:
            rows = replica_copy_rows(p, self.tp_rank)
            if rows is not None:
                shape = [1] * p.dim()
                shape[p.partition_dim] = -1
                rows = (~rows).to(self.device).view(shape).expand(p.shape).reshape(-1)
            self._count_masks[id(p)] = rows
        rows = self._count_masks[id(p)]
        return True if rows is None else rows

    @staticmethod
    def _square(g: torch.Tensor, counts: bool | torch.Tensor) -> torch.Tensor:
        sq = g.detach().double().pow(2).reshape(-1)
        return sq if isinstance(counts, bool) else sq * counts

    def _element_groups(self, p: torch.Tensor) -> torch.Tensor:
        """Index into :attr:`groups` of every element of ``p`` (flattened, int64 on device; built
        per call, only the per-slice indices are kept)."""
        role = p.sgtm_role
        key = id(p)
        if key not in self._groups:
            self._groups[key] = torch.tensor([self.groups.index(int(clip_group(c))) for c in role.classes.tolist()],
                                             dtype=torch.long, device=self.device)
        groups = self._groups[key]
        if role.split_dim is None:
            return groups.expand(p.numel())
        shape = [1] * p.dim()
        shape[role.split_dim] = -1
        return groups.view(shape).expand(p.shape).reshape(-1)

    def _finish(self, sq: torch.Tensor) -> torch.Tensor:
        """Sum squares over all ranks, return per-group clip coefficients (<= 1)."""
        self._all_reduce_norms(sq)
        norms = sq.sqrt()
        self.last_norms = norms
        self.last_coefficients = torch.clamp(self.max_norm / (norms + 1e-6), max=1.0)
        self.runs += 1
        return self.last_coefficients

    @staticmethod
    def _all_reduce_norms(sq: torch.Tensor) -> None:
        """Over every rank. With pipeline stages: the TP x DP ranks of this stage, then the
        pipeline group (each stage holds other blocks' gradients), so every stage clips its part
        of a group by the norm of the whole group, as at PP=1."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            dist.all_reduce(sq)
            return
        dist.all_reduce(sq, group=ps.get_tensor_and_data_parallel_group())
        reduce_over_pipeline(sq)

    def _gradient_pieces(self, optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(flat gradient view, group index of each element) of this rank's gradients: the ZeRO-1/2
        partition's fragments, else ``param.grad`` (valid between the boundary backward and the step)."""
        if dsi.holds_gradient_partition(optimizer):
            out = []
            for p, frag, start in dsi.gradient_fragments(optimizer):
                key = (id(p), start, frag.numel())
                if key not in self._fragment_groups:
                    self._fragment_groups[key] = self._element_groups(p)[start:start + frag.numel()].clone()
                out.append((frag, self._fragment_groups[key]))
            return out
        return [(p.grad.view(-1), self._element_groups(p)) for p in self.params if p.grad is not None]

    @torch.no_grad()
    def nonfinite_groups(self, optimizer) -> list[int]:
        """The groups (:class:`ClipGroup` ids) whose gradient holds a non-finite value on any rank
        (one MAX all-reduce over the world, one host read). Call it before the update."""
        bad = torch.zeros(self.n_groups, device=self.device, dtype=torch.float32)
        for g, groups in self._gradient_pieces(optimizer):
            bad.index_add_(0, groups, (~torch.isfinite(g)).float())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return [g for g, b in zip(self.groups, bad.tolist(), strict=True) if b > 0]

    @torch.no_grad()
    def drop_groups(self, optimizer, groups: list[int]) -> None:
        """Select the gradients of ``groups`` to zero, in place (a selection: their non-finite values
        do not survive as 0 x inf)."""
        drop = torch.zeros(self.n_groups, dtype=torch.bool, device=self.device)
        drop[[self.groups.index(g) for g in groups]] = True
        for g, idx in self._gradient_pieces(optimizer):
            g.copy_(torch.where(drop[idx], 0.0, g))

    def named_norms(self) -> dict[str, float]:
        """The last step's group norms as metrics fields (``grad_norm_retain``, ``grad_norm_forget0``, ...)."""
        if self.last_norms is None:
            return {}
        return {f"grad_norm_{group_name(g)}": n for g, n in zip(self.groups, self.last_norms.tolist(), strict=True)}

    def coefficient(self, group: int) -> float:
        """The last clip coefficient of group ``group`` (a :class:`ClipGroup` id)."""
        if self.last_coefficients is None:
            raise RuntimeError("the clipper has not run yet")
        return float(self.last_coefficients[self.groups.index(group)])

    # -- ZeRO-0: param.grad ----------------------------------------------------------------

    @torch.no_grad()
    def clip_param_grads(self) -> None:
        """ZeRO-0: ``param.grad`` is averaged over DP already, so only TP ranks add up; the
        world all-reduce divides that back out by the DP size."""
        sq = torch.zeros(self.n_groups, device=self.device, dtype=torch.float64)
        with_grad = [p for p in self.params if p.grad is not None]
        for p in with_grad:
            counts = self._counts(p)
            if counts is not False:
                sq.index_add_(0, self._element_groups(p), self._square(p.grad, counts))
        sq /= data_parallel_rank_size()[1]  # every DP rank holds the same full gradient
        coef = self._finish(sq).to(torch.float32)
        for p in with_grad:
            p.grad.mul_(coef[self._element_groups(p)].view(p.shape).to(p.grad.dtype))

    # -- ZeRO-1/2: DeepSpeed's partition ---------------------------------------------------

    @torch.no_grad()
    def clip_zero_partition(self, opt) -> None:
        """Clip this rank's ZeRO-1/2 gradient fragments in place (called inside the optimizer step)."""
        frags = []
        for p, frag, start in dsi.gradient_fragments(opt):
            key = (id(p), start, frag.numel())
            if key not in self._fragment_groups:
                self._fragment_groups[key] = self._element_groups(p)[start:start + frag.numel()].clone()
            counts = self._counts(p)
            if not isinstance(counts, bool):
                counts = counts[start:start + frag.numel()]
            frags.append((frag, self._fragment_groups[key], counts))
        sq = torch.zeros(self.n_groups, device=self.device, dtype=torch.float64)
        for frag, groups, counts in frags:
            if counts is not False:
                sq.index_add_(0, groups, self._square(frag, counts))
        coef = self._finish(sq).to(torch.float32)
        for frag, groups, _ in frags:
            frag.mul_(coef[groups].to(frag.dtype))

    def attach(self, engine) -> None:
        """Refuse an engine in which the clip would not run; hook into a ZeRO-1/2 optimizer
        (ZeRO-0 is clipped by the train step calling :meth:`clip_param_grads`)."""
        dsi.require_clip_hook(engine)
        if dsi.holds_gradient_partition(engine.optimizer):
            dsi.wrap_before_optimizer_clip(engine.optimizer, self.clip_zero_partition)
            self.uses_zero_partition = True
