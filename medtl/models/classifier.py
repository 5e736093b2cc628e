"""What medtl uses from a timm model, for networks built elsewhere (MONAI, torchvision)."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierAdapter(nn.Module):
    """timm's classifier interface over a feature extractor. A subclass sets ``num_features`` and
    ``drop_rate`` and gives ``forward_features`` (the last feature map) and ``pool`` (that map to
    one vector per input); this class adds the head (dropout, then ``fc``) and the rest of the
    interface: ``forward_head``, ``forward``, ``get_classifier``, ``reset_classifier``."""

    num_features: int
    drop_rate: float = 0.0
    num_classes: int = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = nn.functional.dropout(self.pool(x), self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new head of ``num_classes`` outputs (0: the pooled features themselves)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
