"""Typed experiment configuration, composed from YAML and validated once at start.

Three modules, one idea each:

* :mod:`pipeline.config.schema` - the typed dataclasses of every section (the schema), their
  validation and the typed construction from plain data (:func:`from_dict`, :func:`to_dict`);
* :mod:`pipeline.config.composition` - reading YAML on OmegaConf: fragments deep-merged through
  ``base:``, ``key.path=value`` overrides with list indices, :func:`compose` (shared by ``train``,
  ``sweep`` and the tests) and :func:`load_config`;
* :mod:`pipeline.config.placement` - where the forget domains sit (:func:`assign_domains`).

Every problem is raised as :class:`ConfigError` (from :mod:`pipeline.errors`) with a one-line
message that starts with the dotted key, e.g. ``sgtm.domains[0].heads: 40 forget heads but the
model has 32 heads``. Import from here: this is the public API.
"""

from pipeline.config.composition import (
    CONFIG_ROOT,
    apply_override,
    compose,
    find_fragment,
    load_config,
    merge,
    parse_key,
    parse_override,
    read_yaml,
)
from pipeline.config.placement import DomainAssignment, DomainConfig, assign_domains, check_kv_heads
from pipeline.config.schema import (
    PRESETS,
    CalibrationConfig,
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    SGTMConfig,
    SourceConfig,
    TaggingConfig,
    TrainConfig,
    WandbConfig,
    check_moe,
    check_role,
    from_dict,
    to_dict,
)
from pipeline.errors import ConfigError

__all__ = [
    "CONFIG_ROOT", "PRESETS", "CalibrationConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "DomainAssignment", "DomainConfig", "EngineConfig", "EvalConfig", "ExperimentConfig", "LoggingConfig",
    "ModelConfig", "OptimizerConfig", "SGTMConfig", "SourceConfig", "TaggingConfig", "TrainConfig", "WandbConfig",
    "apply_override", "assign_domains", "check_kv_heads", "check_moe", "check_role", "compose", "find_fragment",
    "from_dict", "load_config", "merge", "parse_key", "parse_override", "read_yaml", "to_dict",
]
