"""SGTM core: the forget partition (``partition``), per-token masking (``masking``) and the
method registry (``methods``). It imports only ``pipeline.codes``, ``pipeline.config``,
``pipeline.errors`` and torch: ablation lives beside the model (``pipeline.model.ablate``),
the ``sgtm partition`` and ``check-isolation`` commands in ``pipeline.commands``."""
