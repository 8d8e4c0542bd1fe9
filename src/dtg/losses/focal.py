"""Focal loss for multi-class (softmax) classification, as used in the R-CNN head."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, reduction: str = "mean"
) -> torch.Tensor:
    """Focal loss ``-(1 - p_y)^gamma * log p_y`` over a softmax.

    Args:
        logits: (N, C) raw class scores (class 0 is background in the R-CNN head).
        labels: (N,) int64 target classes in [0, C).
        gamma: focusing parameter; 0 gives cross-entropy.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        A scalar, or (N,) for ``reduction="none"``. ``mean`` over zero rows is 0.
    """
    log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)  # (N,)
    loss = -((1.0 - log_p.exp()).clamp(min=0.0) ** gamma) * log_p
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(loss.numel(), 1)
