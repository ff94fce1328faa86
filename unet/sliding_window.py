"""Sliding-window inference for 3D models, with Gaussian blending of overlapping patches.

Patches of `patch_size` voxels per side are placed so that they cover the volume with at
least the requested overlap; their probabilities are weighted by a Gaussian centred on the
patch (sigma = patch_size / 8 per axis, as in nnU-Net), because a convolutional network's
predictions are least reliable near a patch's border. The weighted sum is divided by the
sum of weights, so every voxel gets a weighted average of the patches that cover it.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

SIGMA_SCALE = 1 / 8


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Return the start offsets along one axis: first at 0, last at size - patch, evenly spaced in between.

    The step is at most patch * (1 - overlap); with size <= patch there is one window at 0.
    """
    if size <= patch:
        return [0]
    step = patch * (1 - overlap)
    count = math.ceil((size - patch) / step) + 1
    return sorted({round(i * (size - patch) / (count - 1)) for i in range(count)})


def gaussian_weights(patch: int, spatial_dims: int = 3) -> torch.Tensor:
    """Return a (patch,) * spatial_dims importance map with its maximum 1 at the centre and no zeros."""
    centre = (patch - 1) / 2
    axis = torch.exp(-((torch.arange(patch) - centre) ** 2) / (2 * (patch * SIGMA_SCALE) ** 2))
    weights = axis
    for _ in range(spatial_dims - 1):
        weights = weights.unsqueeze(-1) * axis
    # Far corners underflow towards 0; a floor keeps every voxel's weight sum positive.
    return torch.clamp(weights / weights.max(), min=1e-3)


@torch.no_grad()
def sliding_window_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    target: str,
    patch_size: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Predict a (C, X, Y, Z) volume with a 3D model; returns float32 probabilities (K, X, Y, Z).

    Sigmoid for `target == "regions"`, softmax over classes otherwise. Sides shorter than
    `patch_size` are zero-padded for the forward pass and cropped back.
    """
    model.eval()
    device = torch.device(device)
    spatial = image.shape[1:]
    padded = [max(s, patch_size) for s in spatial]
    volume = torch.zeros((image.shape[0], *padded), dtype=torch.float32)
    volume[(slice(None), *(slice(0, s) for s in spatial))] = torch.from_numpy(np.asarray(image, dtype=np.float32))
    weights = gaussian_weights(patch_size, len(spatial))
    starts = [patch_starts(s, patch_size, overlap) for s in padded]
    positions = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]

    accumulated = None
    weight_sum = torch.zeros(padded, dtype=torch.float32)
    for first in range(0, len(positions), batch_size):
        group = positions[first:first + batch_size]
        windows = [tuple(slice(p, p + patch_size) for p in position) for position in group]
        batch = torch.stack([volume[(slice(None), *window)] for window in windows]).to(device)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            logits = model(batch)
        logits = logits.float().cpu()
        probabilities = torch.sigmoid(logits) if target == "regions" else torch.softmax(logits, dim=1)
        if accumulated is None:
            accumulated = torch.zeros((probabilities.shape[1], *padded), dtype=torch.float32)
        for window, patch_probabilities in zip(windows, probabilities):
            accumulated[(slice(None), *window)] += patch_probabilities * weights
            weight_sum[window] += weights
    result = accumulated / weight_sum
    return result[(slice(None), *(slice(0, s) for s in spatial))].numpy()
