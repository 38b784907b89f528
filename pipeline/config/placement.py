"""Where the forget domains sit: ``sgtm.domains`` resolved against the model into global head,
MLP-unit and expert indices (:func:`assign_domains`), and the TP rule for KV heads
(:func:`check_kv_heads`).

Config semantics, validated with the rest of the config (:meth:`ExperimentConfig.validate
<pipeline.config.schema.ExperimentConfig.validate>` runs it) and read by the forget partition
(:mod:`pipeline.sgtm.partition`), which builds its per-rank classes from the same rules. It reads
only the few fields named by :class:`ModelShape` and :class:`ForgetSpec`, so it sits below the
schema that defines the sections (no import circle)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.errors import ConfigError


class ModelShape(Protocol):
    """What placement reads of a model section (:class:`pipeline.config.ModelConfig`)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_experts: int
    moe_top_k: int

    @property
    def query_heads_per_kv_head(self) -> int: ...

    @property
    def mlp_units(self) -> int: ...


class ForgetSpec(Protocol):
    """What placement reads of the sgtm section (:class:`pipeline.config.SGTMConfig`)."""

    scope: str
    domains: list[DomainConfig]


@dataclass
class DomainConfig:
    """One forget domain: its heads and MLP units in every forget block.

    ``heads``/``units`` are either a count (the domain then takes the next free global indices,
    domains in list order) or explicit global indices."""

    name: str = "forget"
    heads: int | list[int] = 1
    units: int | list[int] = 64
    # MoE models: whole routed experts this domain owns in each of its blocks (a count takes the
    # next free global expert indices; or explicit indices). ``units`` then index the shared experts.
    experts: int | list[int] = 0
    layers: list[int] | None = None  # blocks that carry forget parameters; None = all


@dataclass(frozen=True)
class DomainAssignment:
    """Where one forget domain lives: its blocks and its global head and MLP-unit indices (the
    same in each of those blocks)."""

    name: str
    layers: list[int]
    heads: list[int]
    units: list[int]
    experts: list[int] = field(default_factory=list)


def _take(spec: int | list[int], total: int, taken: set[int], key: str, what: str) -> list[int]:
    """Resolve a count or explicit index list into global indices, checking overlaps."""
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"{key}: number of forget {what} must be >= 0, got {spec}")
        if spec == 0:
            return []
        free = [i for i in range(total) if i not in taken]
        if spec > len(free) - 1:
            raise ConfigError(f"{key}: {spec} forget {what} but only {len(free)} of {total} are free "
                              f"and at least one must stay retain")
        return free[:spec]
    idx = list(spec)
    if not idx:
        return []
    if len(set(idx)) != len(idx):
        raise ConfigError(f"{key}: duplicate {what} indices {idx}")
    for i in idx:
        if not 0 <= i < total:
            raise ConfigError(f"{key}: {what} index {i} out of range [0, {total})")
        if i in taken:
            raise ConfigError(f"{key}: {what} index {i} already belongs to another domain")
    if len(taken) + len(idx) >= total:
        raise ConfigError(f"{key}: forget {what} would cover all {total}; at least one must stay retain")
    return sorted(idx)


def check_kv_heads(model: ModelShape, tp: int) -> None:
    """Each TP rank holds whole KV groups (TP divides n_kv_heads), or TP is a multiple of
    n_kv_heads and every KV head is replicated on TP / n_kv_heads ranks (megatron's scheme)."""
    if model.n_kv_heads % tp and tp % model.n_kv_heads:
        raise ConfigError(f"engine.tensor_parallel: {tp} must divide model.n_kv_heads={model.n_kv_heads} (whole KV "
                          f"groups per rank) or be a multiple of it (KV heads replicated on TP/n_kv_heads ranks)")


def _take_heads(spec: int | list[int], model: ModelShape, taken: set[int], key: str) -> list[int]:
    """Forget heads. With grouped-query attention a forget attention unit is a whole KV group (its
    K/V rows and all its query heads), so a count must be a multiple of the group size (the next
    free groups are taken) and explicit query-head indices must cover whole groups."""
    group = model.query_heads_per_kv_head
    if group == 1:
        return _take(spec, model.n_heads, taken, key, "heads")
    what = f"with model.n_kv_heads={model.n_kv_heads}, {group} query heads share a KV head and forget heads " \
           f"must be whole KV groups"
    if isinstance(spec, int):
        if spec % group:
            raise ConfigError(f"{key}: {what}: a count must be a multiple of {group}, got {spec}")
        groups = _take(spec // group, model.n_kv_heads, {h // group for h in taken}, key, "KV groups")
        return [g * group + i for g in groups for i in range(group)]
    heads = list(spec)
    if any(not isinstance(h, int) or h // group * group + i not in heads for h in heads for i in range(group)):
        raise ConfigError(f"{key}: {what}, got {heads}")
    return _take(heads, model.n_heads, taken, key, "heads")


def _take_experts(spec: int | list[int], model: ModelShape, sgtm: ForgetSpec, taken: set[int],
                  key: str) -> list[int]:
    """Whole routed experts of one domain. At least ``moe_top_k`` experts stay retain, so a
    retain-mode token (never routed to a forget expert) still has top_k experts to choose from."""
    if spec in (0, []):
        return []
    if not model.n_experts:
        raise ConfigError(f"{key}: forget experts need an MoE model (model.n_experts > 0), got {spec!r}")
    if sgtm.scope == "attention":
        raise ConfigError(f"{key}: sgtm.scope is 'attention' (no MLP forget parameters), got {spec!r}")
    experts = _take(spec, model.n_experts, taken, key, "experts")
    if model.n_experts - len(taken) - len(experts) < model.moe_top_k:
        raise ConfigError(f"{key}: {len(taken) + len(experts)} forget experts leave fewer than "
                          f"model.moe_top_k={model.moe_top_k} of {model.n_experts} retain experts")
    return experts


_DOMAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DomainConfig)}


def _refuse_dropped(dom: DomainConfig, scope: str, key: str) -> None:
    """``scope: mlp`` has no forget heads and ``scope: attention`` no forget units: a domain that
    asks for some (anything but 0, [] or the default) would lose them without a word."""
    dropped = {"mlp": "heads", "attention": "units"}.get(scope)
    if dropped is None:
        return
    value = getattr(dom, dropped)
    if value not in (0, [], _DOMAIN_DEFAULTS[dropped]):
        raise ConfigError(f"{key}.{dropped}: sgtm.scope is {scope!r} (no forget {dropped}), got {value!r}; "
                          f"expected 0 or sgtm.scope 'attention_mlp'")


def assign_domains(model: ModelShape, sgtm: ForgetSpec) -> list[DomainAssignment]:
    """What ``sgtm.domains`` means for this model: a count takes the next free global indices
    (domains in list order), explicit indices are checked for range and overlap, and at least one
    head and one unit stay retain. Config semantics, so it lives here and needs nothing from
    :mod:`pipeline.sgtm`: validation runs it without importing the model code (no import
    circle), and the forget partition builds its per-rank classes from the same rules."""
    names = [d.name for d in sgtm.domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"sgtm.domains: duplicate domain names {names}")
    for i, name in enumerate(names):
        if not name or ":" in name:
            raise ConfigError(f"sgtm.domains[{i}].name: must be non-empty without ':', got {name!r}")
    heads_taken: set[int] = set()
    units_taken: set[int] = set()
    experts_taken: set[int] = set()
    out = []
    for d, dom in enumerate(sgtm.domains):
        key = f"sgtm.domains[{d}]"
        _refuse_dropped(dom, sgtm.scope, key)
        layers = list(range(model.n_layers)) if dom.layers is None else list(dom.layers)
        for layer in layers:
            if not 0 <= layer < model.n_layers:
                raise ConfigError(f"{key}.layers: block {layer} out of range [0, {model.n_layers})")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{key}.layers: duplicate block indices {layers}")
        heads = [] if sgtm.scope == "mlp" else _take_heads(dom.heads, model, heads_taken, f"{key}.heads")
        if model.n_experts and not model.mlp_units and dom.units not in (0, []) and sgtm.scope != "attention":
            raise ConfigError(f"{key}.units: model.n_experts={model.n_experts} with model.moe_shared_experts=0 has no "
                              f"dense MLP units (units index the shared experts); set units: 0 and use experts")
        units = [] if sgtm.scope == "attention" else _take(dom.units, model.mlp_units, units_taken, f"{key}.units",
                                                           "units")
        heads_taken.update(heads)
        units_taken.update(units)
        experts = _take_experts(dom.experts, model, sgtm, experts_taken, f"{key}.experts")
        experts_taken.update(experts)
        out.append(DomainAssignment(dom.name, layers, heads, units, experts))
    return out
