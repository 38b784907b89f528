"""SGTM core: the forget partition, per-token modes, masking and ablation."""
