"""The ordinary Faster R-CNN box-head losses, with a choice of classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtg.losses.focal import softmax_focal_loss


def rcnn_losses(
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    labels: torch.Tensor,
    regression_targets: torch.Tensor,
    cls_loss: str = "ce",
    focal_gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification and box-regression loss of the R-CNN head (torchvision's convention).

    Args:
        class_logits: (R, K + 1) logits, class 0 = background.
        box_deltas: (R, (K + 1) * 4) class-specific deltas.
        labels: (R,) int64 in [0, K].
        regression_targets: (R, 4) encoded targets (only rows with label > 0 are used).
        cls_loss: ``"ce"`` (cross-entropy) or ``"focal"`` (softmax focal loss).
        focal_gamma: gamma of the focal loss.

    Returns:
        ``(loss_cls, loss_reg)``; both averaged over the R sampled RoIs
        (regression: smooth L1 with beta 1/9 summed over positives, divided by R).
    """
    num = max(labels.numel(), 1)
    if cls_loss == "focal":
        loss_cls = softmax_focal_loss(class_logits, labels, focal_gamma, reduction="sum") / num
    elif cls_loss == "ce":
        loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / num
    else:
        raise ValueError(f"unknown R-CNN classification loss '{cls_loss}'")
    pos = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[pos, labels[pos]]  # (P, 4)
    loss_reg = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9, reduction="sum") / num
    return loss_cls, loss_reg
