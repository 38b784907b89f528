"""What the dense model (:mod:`pipeline.model.transformer`) and the mixture of experts
(:mod:`pipeline.model.moe`) both build on: a module whose activations are split into retain and
forget features (attention heads, MLP units, routed experts), with the ablation switch."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.sgtm.masking import InputFeatures, ablate_features


class SplitFeatures(nn.Module):
    """Mixin state for a module whose activations are split into retain/forget features."""

    def _init_features(self, feature_class: torch.Tensor, width: int = 1) -> None:
        self.register_buffer("feature_class", feature_class, persistent=False)
        self.register_buffer("ablated", None, persistent=False)
        self.has_forget = bool((feature_class >= 0).any())
        # Column spans of each class in the row-parallel layer's input (built once, on the host).
        self.features = InputFeatures(feature_class, width)

    def set_ablated(self, domains: list[int]) -> None:
        """Switch the features of ``domains`` off for every token (after ablation)."""
        off = torch.isin(self.feature_class, torch.tensor(domains, dtype=torch.long,
                                                          device=self.feature_class.device))
        self.ablated = off if bool(off.any()) else None

    def _ablate(self, h: torch.Tensor) -> torch.Tensor:
        """Ablated features off for every token. The per-token masking (retain-mode tokens,
        gradient routing) happens in the row-parallel layer, given ``self.features``."""
        return h if self.ablated is None else ablate_features(h, self.ablated)
