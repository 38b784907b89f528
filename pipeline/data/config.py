"""The `data:` section of an experiment. It is defined with the rest of the typed config in
:mod:`pipeline.config` (one parser, one-line errors naming the key); re-exported here for the data
layer's imports."""

from pipeline.config import DataConfig, SourceConfig, TaggingConfig

__all__ = ["DataConfig", "SourceConfig", "TaggingConfig"]
