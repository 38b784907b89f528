"""Gradient clipping per partition: retain+joint parameters and each forget[d] get their own norm.

Global-norm clipping would let forget-labelled data (whose gradient lands in forget[d]) shrink
the retain update of the same step, breaking isolation. Here each group is clipped by its own
norm, computed over all ranks (TP-replicated parameters counted once).

Where the gradients are differs by engine setup:
* ZeRO-0 fp32: in ``param.grad`` after the boundary backward; :meth:`clip_param_grads` runs
  before ``engine.step()``.
* ZeRO-1/2: DeepSpeed holds this rank's partition in ``optimizer.averaged_gradients`` (a list of
  per-parameter fragments, or one flat buffer with bf16 + fp32 accumulation). We wrap the
  optimizer's ``scaled_global_norm`` (called once per step, before its own clipping) so the
  fragments are clipped in place, locating each parameter's fragment through DeepSpeed's
  ``_hp_mapping``. DeepSpeed's own clipping stays off (``gradient_clipping: 0``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

RETAIN_GROUP = 0  # retain + joint; forget domain d is group 1 + d


def _group_of_class(classes: torch.Tensor) -> torch.Tensor:
    return torch.where(classes >= 0, classes + 1, torch.zeros_like(classes))


class PartitionClipper:
    def __init__(self, model: torch.nn.Module, n_domains: int, max_norm: float, device: torch.device):
        self.max_norm = max_norm
        self.n_groups = 1 + n_domains
        self.device = device
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.last_norms: torch.Tensor | None = None  # per group, before clipping
        self._fragment_index: dict[int, torch.Tensor] = {}

    # -- shared ----------------------------------------------------------------------------

    def _counts(self, p: torch.Tensor) -> bool:
        """Replicated parameters are counted on TP rank 0 only."""
        return bool(getattr(p, "tensor_model_parallel", False)) or self.tp_rank == 0

    def _element_groups(self, p: torch.Tensor) -> torch.Tensor:
        """Group id of every element of ``p`` (flattened, int64 on device)."""
        role = p.sgtm_role
        groups = _group_of_class(role.classes).to(self.device)
        if role.split_dim is None:
            return groups.expand(p.numel())
        shape = [1] * p.dim()
        shape[role.split_dim] = -1
        return groups.view(shape).expand(p.shape).reshape(-1)

    def _finish(self, sq: torch.Tensor) -> torch.Tensor:
        """Sum squares over all ranks, return per-group clip coefficients (<= 1)."""
        dist.all_reduce(sq)
        norms = sq.sqrt()
        self.last_norms = norms
        return torch.clamp(self.max_norm / (norms + 1e-6), max=1.0)

    # -- ZeRO-0: param.grad ----------------------------------------------------------------

    @torch.no_grad()
    def clip_param_grads(self) -> None:
        """ZeRO-0: ``param.grad`` is averaged over DP already, so only TP ranks add up; the
        world all-reduce divides that back out by the DP size."""
        sq = torch.zeros(self.n_groups, device=self.device, dtype=torch.float64)
        with_grad = [p for p in self.params if p.grad is not None]
        for p in with_grad:
            if self._counts(p):
                sq.index_add_(0, self._element_groups(p), p.grad.detach().double().pow(2).reshape(-1))
        sq /= ps.get_data_parallel_world_size()  # every DP rank holds the same full gradient
        coef = self._finish(sq).to(torch.float32)
        for p in with_grad:
            p.grad.mul_(coef[self._element_groups(p)].view(p.shape).to(p.grad.dtype))

    # -- ZeRO-1/2: DeepSpeed's partition ---------------------------------------------------

    def _fragments(self, opt) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(flat gradient fragment, element groups, counts) for everything in this rank's partition."""
        out = []
        for i in range(len(opt.bit16_groups)):
            grads = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) \
                else opt.averaged_gradients[i]
            if grads is None:
                continue
            for j, p in enumerate(opt.params_in_partition[i]):
                mapping = p._hp_mapping
                lp = mapping.lp_fragment_address
                key = id(p)
                if key not in self._fragment_index:
                    self._fragment_index[key] = self._element_groups(p)[lp.start:lp.start + lp.numel].clone()
                if isinstance(grads, torch.Tensor):  # compact flat buffer, laid out like the fp32 partition
                    hp = mapping.get_hp_fragment_address()
                    frag = grads.narrow(0, hp.start, hp.numel)
                else:
                    frag = grads[j].view(-1)
                    if frag.numel() != lp.numel:
                        raise RuntimeError(f"ZeRO gradient fragment of {tuple(p.shape)}: {frag.numel()} elements, "
                                           f"mapping says {lp.numel}; DeepSpeed layout changed")
                out.append((frag, self._fragment_index[key], self._counts(p)))
        return out

    @torch.no_grad()
    def clip_zero_partition(self, opt) -> None:
        frags = self._fragments(opt)
        sq = torch.zeros(self.n_groups, device=self.device, dtype=torch.float64)
        for frag, groups, counts in frags:
            if counts:
                sq.index_add_(0, groups, frag.double().pow(2))
        coef = self._finish(sq).to(torch.float32)
        for frag, groups, _ in frags:
            frag.mul_(coef[groups].to(frag.dtype))

    def attach(self, engine) -> None:
        """Hook into DeepSpeed's ZeRO-1/2 optimizer (no-op for ZeRO-0)."""
        opt = engine.optimizer
        if not hasattr(opt, "averaged_gradients"):
            return
        original = opt.scaled_global_norm

        def scaled_global_norm(*args, **kwargs):
            self.clip_zero_partition(opt)
            return original(*args, **kwargs)

        opt.scaled_global_norm = scaled_global_norm
        self.uses_zero_partition = True

    uses_zero_partition = False
