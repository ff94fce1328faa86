"""Segmentation losses: soft Dice plus BCE for region outputs, soft Dice plus CE for classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over channels; (B, K, *spatial) probabilities and one-hot/binary targets.

    Sums run over the batch and the spatial axes together ("batch Dice"), so a channel that is
    empty in one sample does not produce a 0/0 term; SMOOTH keeps an all-empty channel finite.
    """
    axes = [0] + list(range(2, probabilities.ndim))
    intersection = (probabilities * targets).sum(axes)
    denominator = probabilities.sum(axes) + targets.sum(axes)
    dice = (2 * intersection + SMOOTH) / (denominator + SMOOTH)
    return 1 - dice.mean()


def region_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice + BCE for (B, 3, *spatial) logits against binary WT, TC, ET targets of the same shape."""
    logits = logits.float()
    return soft_dice_loss(torch.sigmoid(logits), targets) + F.binary_cross_entropy_with_logits(logits, targets)


def class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice (foreground classes) + CE for (B, 4, *spatial) logits against (B, *spatial) class indices."""
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(targets, logits.shape[1]).movedim(-1, 1).float()
    return soft_dice_loss(probabilities[:, 1:], one_hot[:, 1:]) + F.cross_entropy(logits, targets)
