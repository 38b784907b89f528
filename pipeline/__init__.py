"""SGTM pretraining pipeline: selective gradient masking on DeepSpeed + megatron-core."""

__version__ = "0.1.0"
