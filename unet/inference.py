"""Whole-volume inference with a 2D U-Net, and loading of trained models.

A model is a checkpoint file written by training (`model/checkpoint.pt`) or an MLflow model
URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...`) whose artifacts hold that
checkpoint. The checkpoint carries the architecture, the target kind, the modalities in
channel order and the preprocessing settings, so nothing else is needed to predict.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet.labels import regions_to_labels
from unet.model import UNet

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint.pt"


def _mirror_flips(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Return every subset of `mirror_axes` (image axes 0 = X, 1 = Y) as dims of a (B, C, X, Y) batch."""
    unknown = [axis for axis in mirror_axes if axis not in (0, 1)]
    if unknown:
        raise ValueError(
            f"invalid mirror axis {unknown[0]} in mirror_axes={tuple(mirror_axes)}: slices are 2D, "
            "so only the in-plane axes 0 (X) and 1 (Y) can be mirrored"
        )
    axes = sorted(set(mirror_axes))
    flips: list[tuple[int, ...]] = [()]
    for axis in axes:
        flips += [flip + (axis + 2,) for flip in flips]
    return flips


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    target: str,
    batch_size: int = 16,
    threshold: float = 0.5,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mirror_axes: tuple[int, ...] = (),
) -> np.ndarray:
    """Segment a (C, X, Y, Z) volume slice by slice along Z; returns canonical labels (X, Y, Z) uint8.

    Region outputs are thresholded per region and nested into one label map (ET inside TC
    inside WT); class outputs take the argmax. Any in-plane size works (the model pads).

    Test-time mirroring: with `mirror_axes`, for example (0, 1), each batch is also segmented
    flipped along every combination of those in-plane axes (4 passes for two axes). The
    sigmoid or softmax probabilities, flipped back, are averaged before thresholding or argmax.
    """
    flips = _mirror_flips(tuple(mirror_axes))
    model.eval()
    device = torch.device(device)
    depth = image.shape[3]
    labels = np.zeros(image.shape[1:], dtype=np.uint8)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for start in range(0, depth, batch_size):
        stop = min(start + batch_size, depth)
        batch = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image[..., start:stop]), 3, 0)))
        batch = batch.to(device=device, dtype=torch.float32)  # (B, C, X, Y)
        probabilities = None
        for dims in flips:
            with autocast:
                logits = model(torch.flip(batch, dims) if dims else batch)
            logits = logits.float()
            if dims:
                logits = torch.flip(logits, dims)
            # Averaging probabilities, not logits, keeps one confident pass from outvoting the rest.
            current = torch.sigmoid(logits) if target == "regions" else torch.softmax(logits, dim=1)
            probabilities = current if probabilities is None else probabilities + current
        probabilities /= len(flips)
        if target == "regions":
            regions = (probabilities > threshold).cpu().numpy()  # (B, 3, X, Y)
            predicted = regions_to_labels(np.moveaxis(regions, 0, -1))  # (X, Y, B)
        else:
            predicted = np.moveaxis(probabilities.argmax(dim=1).cpu().numpy().astype(np.uint8), 0, -1)
        labels[..., start:stop] = predicted
    return labels


def segment_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    metadata: dict[str, Any],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mirror_axes: tuple[int, ...] = (),
) -> np.ndarray:
    """Segment a preprocessed (C, X, Y, Z) volume with the model a checkpoint describes; returns labels (X, Y, Z) uint8.

    2D models predict slice by slice; 3D models use Gaussian-blended sliding windows of the
    training patch size, overlapping by `evaluate.overlap` from the checkpoint's params.
    """
    target = metadata["target"]
    threshold = metadata.get("threshold", 0.5)
    if metadata["model_config"].get("spatial_dims", 2) == 2:
        return predict_volume(model, image, target, batch_size, threshold, device, amp_dtype, mirror_axes)
    if mirror_axes:
        raise ValueError("test-time mirroring is implemented for 2D models only; drop --tta or evaluate.tta_mirroring")
    from unet.sliding_window import sliding_window_probabilities

    params = metadata.get("params", {})
    patch_size = params.get("train", {}).get("patch_size", 64)
    overlap = params.get("evaluate", {}).get("overlap", 0.5)
    probabilities = sliding_window_probabilities(model, image, target, patch_size, overlap, batch_size, device, amp_dtype)
    if target == "regions":
        return regions_to_labels(probabilities > threshold)
    return probabilities.argmax(axis=0).astype(np.uint8)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Build the U-Net stored in a training checkpoint; returns (model in eval mode, checkpoint metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a checkpoint file or a models:/ URI")
    # The checkpoint contains plain Python metadata next to tensors, so the full unpickler is needed;
    # only load checkpoints from a source you trust.
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is not a checkpoint written by `unet train` ({error}); pass model/checkpoint.pt "
                         "or a models:/ URI") from error
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise ValueError(f"{path} is not a checkpoint written by `unet train` (missing 'model' or 'model_config')")
    model = UNet(**state["model_config"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    metadata = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    return model, metadata


def resolve_model(model_ref: str, download_dir: Path | None = None) -> Path:
    """Return a local checkpoint path for a checkpoint path or an MLflow model URI."""
    if "://" not in model_ref and not model_ref.startswith(("models:/", "runs:/")):
        return Path(model_ref)
    import mlflow

    if model_ref.startswith("models:/") and "/" not in model_ref[len("models:/"):] and "@" not in model_ref:
        raise ValueError(f"model URI {model_ref} names no version or alias; use {model_ref}@staging or {model_ref}/VERSION")
    log.info("downloading %s from %s", model_ref, mlflow.get_tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_ref, dst_path=str(download_dir) if download_dir else None))
    candidates = sorted(local.rglob(CHECKPOINT_ARTIFACT))
    if not candidates:
        raise FileNotFoundError(f"model {model_ref} has no {CHECKPOINT_ARTIFACT} among its artifacts; was it logged by `unet register`?")
    return candidates[0]
