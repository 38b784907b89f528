"""The forget partition: the one place that says which parameters belong to which forget domain.

Everything is defined by *global* head and MLP-unit indices, then mapped onto the contiguous
shard of heads/units that each tensor-parallel rank owns (a forget head may live on any rank;
a rank may own none). Every parameter tensor of the model gets a :class:`ParamRole` from
:meth:`ForgetPartition.role`: a class per slice along one dimension, or one class for the whole
tensor. The masking, the ablation, per-partition clipping and the tests all read these roles.

Slice classes are :class:`pipeline.codes.ParamClass` values (ints, so a per-feature class
vector is a plain LongTensor): ``d >= 0`` forget parameters of domain d, ``RETAIN``,
``JOINT_NON_FORGET``, ``JOINT_ALL``; which tokens may update each is the table
:data:`pipeline.codes.MAY_UPDATE`.

Joint policy: embeddings (token and learned position) follow ``sgtm.embedding_update``; norms,
the final norm and an untied LM head follow ``sgtm.joint_update``. A tied LM head *is* the token
embedding matrix, so it has the embedding's class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.codes import ParamClass, class_name, update_table
from pipeline.config import ConfigError, ModelConfig, SGTMConfig, assign_domains, check_kv_heads

ROLE_KINDS = (
    "embedding", "position_embedding", "norm", "qkv", "attn_out", "attn_out_bias",
    "mlp_in", "mlp_out", "mlp_out_bias", "final_norm", "lm_head",
)


@dataclass(frozen=True)
class ParamRole:
    """What each slice of one (local) parameter tensor is.

    ``split_dim`` is the dimension along which the class varies (0: output rows of a column-
    parallel weight and its bias; 1: input columns of a row-parallel weight), or None when the
    whole tensor has the single class ``classes[0]``."""

    kind: str
    layer: int | None
    split_dim: int | None
    classes: torch.Tensor  # LongTensor, one entry per index along split_dim (or one entry)

    @property
    def forget_domains(self) -> list[int]:
        return sorted(int(c) for c in torch.unique(self.classes) if c >= 0)

    def slice_mask(self, param: torch.Tensor, cls: set[int]) -> torch.Tensor:
        """Bool tensor broadcastable to ``param``: True where the slice class is in ``cls``."""
        hit = torch.zeros_like(self.classes, dtype=torch.bool)
        for c in cls:
            hit |= self.classes == c
        if self.split_dim is None:
            return hit.reshape([1] * param.dim())
        shape = [1] * param.dim()
        shape[self.split_dim] = -1
        return hit.reshape(shape)


class ForgetPartition:
    """Global forget heads/units per block and domain, and what each TP rank owns of them."""

    def __init__(self, model: ModelConfig, sgtm: SGTMConfig, tp_size: int = 1):
        self.model = model
        self.sgtm = sgtm
        self.tp_size = tp_size
        self.domains = [d.name for d in sgtm.domains]
        if model.n_heads % tp_size:
            raise ConfigError(f"engine.tensor_parallel: {tp_size} does not divide model.n_heads={model.n_heads}")
        check_kv_heads(model, tp_size)
        if model.d_ff % tp_size:
            raise ConfigError(f"engine.tensor_parallel: {tp_size} does not divide model.d_ff={model.d_ff}")
        self.heads_per_rank = model.n_heads // tp_size
        # KV heads a rank holds, and how many TP ranks hold a copy of each: n_kv_heads < TP
        # replicates them (megatron's scheme): rank r holds KV group r // kv_replicas and its
        # share of that group's query heads. A forget group is forget on every rank holding it.
        self.kv_heads_per_rank = max(1, model.n_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // model.n_kv_heads)
        self.units_per_rank = model.mlp_units // tp_size  # MoE: the shared experts' units (maybe none)

        # Global class per head and per unit, for every block: [n_layers][n_heads|d_ff]. Where each
        # domain sits is config semantics (assign_domains: counts, explicit indices, their checks).
        self._head_class = [[ParamClass.RETAIN] * model.n_heads for _ in range(model.n_layers)]
        self._unit_class = [[ParamClass.RETAIN] * model.mlp_units for _ in range(model.n_layers)]
        # MoE: the class of every routed expert (whole experts; pipeline/model/moe.py places them on EP ranks).
        self._expert_class = [[ParamClass.RETAIN] * model.n_experts for _ in range(model.n_layers)]
        for d, placed in enumerate(assign_domains(model, sgtm)):
            for layer in placed.layers:
                for h in placed.heads:
                    self._head_class[layer][h] = d
                for u in placed.units:
                    self._unit_class[layer][u] = d
                for e in placed.experts:
                    self._expert_class[layer][e] = d

    # ---- global view -------------------------------------------------------------------------

    def heads(self, layer: int, domain: int) -> list[int]:
        return [h for h, c in enumerate(self._head_class[layer]) if c == domain]

    def units(self, layer: int, domain: int) -> list[int]:
        return [u for u, c in enumerate(self._unit_class[layer]) if c == domain]

    def experts(self, layer: int, domain: int) -> list[int]:
        return [e for e, c in enumerate(self._expert_class[layer]) if c == domain]

    def expert_class(self, layer: int) -> torch.Tensor:
        """[n_experts] class of every routed expert of block ``layer`` (MoE models; empty otherwise)."""
        return torch.tensor(self._expert_class[layer], dtype=torch.long)

    def head_class(self, layer: int) -> torch.Tensor:
        return torch.tensor(self._head_class[layer], dtype=torch.long)

    def unit_class(self, layer: int) -> torch.Tensor:
        return torch.tensor(self._unit_class[layer], dtype=torch.long)

    # ---- per-rank view -----------------------------------------------------------------------

    def local_head_class(self, layer: int, tp_rank: int) -> torch.Tensor:
        n = self.heads_per_rank
        return self.head_class(layer)[tp_rank * n:(tp_rank + 1) * n]

    def local_unit_class(self, layer: int, tp_rank: int) -> torch.Tensor:
        n = self.units_per_rank
        return self.unit_class(layer)[tp_rank * n:(tp_rank + 1) * n]

    def owned(self, tp_rank: int) -> dict[str, dict[int, dict[str, list[int]]]]:
        """Global forget heads/units this rank owns: {domain: {layer: {'heads': [...], 'units': [...]}}}."""
        h0, u0 = tp_rank * self.heads_per_rank, tp_rank * self.units_per_rank
        out: dict[str, dict[int, dict[str, list[int]]]] = {}
        for d, name in enumerate(self.domains):
            per_layer = {}
            for layer in range(self.model.n_layers):
                hs = [h for h in self.heads(layer, d) if h0 <= h < h0 + self.heads_per_rank]
                us = [u for u in self.units(layer, d) if u0 <= u < u0 + self.units_per_rank]
                if hs or us:
                    per_layer[layer] = {"heads": hs, "units": us}
            out[name] = per_layer
        return out

    # ---- parameter roles ---------------------------------------------------------------------

    def _joint(self, policy: str) -> int:
        return ParamClass.JOINT_ALL if policy == "all" else ParamClass.JOINT_NON_FORGET

    def role(self, kind: str, layer: int | None, tp_rank: int) -> ParamRole:
        """The class of every slice of the local parameter ``kind`` of block ``layer``."""
        m, s = self.model, self.sgtm
        whole = lambda cls: ParamRole(kind, layer, None, torch.tensor([cls]))  # noqa: E731
        if kind in ("embedding", "position_embedding"):
            return whole(self._joint(s.embedding_update))
        if kind in ("norm", "final_norm", "lm_head"):
            return whole(self._joint(s.joint_update))
        assert layer is not None, kind
        heads = self.local_head_class(layer, tp_rank)
        units = self.local_unit_class(layer, tp_rank)
        joint_out = s.output_projections == "joint"
        if kind == "qkv":  # rows are KV-group-major: [q of the group's heads, k_g, v_g] per local group
            per = self.heads_per_rank // self.kv_heads_per_rank  # local query heads of a group
            groups = heads[::per]  # forget heads are whole groups (config.assign_domains)
            return ParamRole(kind, layer, 0, groups.repeat_interleave((per + 2) * m.head_dim))
        if kind == "mlp_in":  # swiglu: rows are [gate units; up units], a unit owns both
            rows = torch.cat([units, units]) if m.mlp == "swiglu" else units
            return ParamRole(kind, layer, 0, rows)
        if kind == "attn_out":
            if joint_out:
                return whole(self._joint(s.joint_update))
            return ParamRole(kind, layer, 1, heads.repeat_interleave(m.head_dim))
        if kind == "mlp_out":
            if joint_out:
                return whole(self._joint(s.joint_update))
            return ParamRole(kind, layer, 1, units)
        if kind in ("attn_out_bias", "mlp_out_bias"):
            return whole(self._joint(s.joint_update) if joint_out else ParamClass.RETAIN)
        raise KeyError(f"unknown parameter kind {kind!r} (expected one of {ROLE_KINDS})")

    # ---- reporting ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Saved with checkpoints so a model can be ablated without its config."""
        return {
            "domains": self.domains,
            "tp_size": self.tp_size,
            "heads": {n: [self.heads(layer, d) for layer in range(self.model.n_layers)]
                      for d, n in enumerate(self.domains)},
            "units": {n: [self.units(layer, d) for layer in range(self.model.n_layers)]
                      for d, n in enumerate(self.domains)},
            "experts": {n: [self.experts(layer, d) for layer in range(self.model.n_layers)]
                        for d, n in enumerate(self.domains)},
            "joint_update": self.sgtm.joint_update,
            "embedding_update": self.sgtm.embedding_update,
            "output_projections": self.sgtm.output_projections,
        }

    def summary(self) -> str:
        lines = []
        for d, name in enumerate(self.domains):
            blocks = [layer for layer in range(self.model.n_layers)
                      if self.heads(layer, d) or self.units(layer, d) or self.experts(layer, d)]
            if not blocks:
                lines.append(f"forget[{name}]: no parameters")
                continue
            b0 = blocks[0]
            lines.append(f"forget[{name}]: blocks {blocks}, heads {self.heads(b0, d)} of {self.model.n_heads}, "
                         f"{len(self.units(b0, d))} of {self.model.mlp_units} MLP units"
                         + (f", routed experts {self.experts(b0, d)} of {self.model.n_experts}"
                            if self.model.n_experts else ""))
        s = self.sgtm
        head = (f"LM head tied to the token embedding: {class_name(self._joint(s.embedding_update), self.domains)}"
                if self.model.tie_embeddings else
                f"LM head (untied): {class_name(self._joint(s.joint_update), self.domains)}")
        lines.append(f"joint: embeddings {class_name(self._joint(s.embedding_update), self.domains)} "
                     f"(embedding_update={s.embedding_update}); norms and final norm "
                     f"{class_name(self._joint(s.joint_update), self.domains)} (joint_update={s.joint_update}); "
                     f"{head}")
        out = "split (forget columns are forget, the rest and the output bias retain)" \
            if s.output_projections == "split" else \
            f"joint: {class_name(self._joint(s.joint_update), self.domains)}"
        lines.append(f"output projections (W_O, W_2, their biases): {out}")
        lines.append(f"attention across forget/non-forget boundaries: {s.cross_mode_attention}")
        lines.append(update_table(s.strategy))
        return "\n".join(lines)
