"""SGTM pretraining pipeline: selective gradient masking on DeepSpeed + megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import, four times (8 stderr lines in every command), that Transformer
# Engine and Apex are absent. This pipeline uses neither (its own layers, torch optimizers,
# DeepSpeed), so the message says nothing about a run; only that message from megatron is hidden.
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed",
                        category=UserWarning, module=r"megatron\.")
