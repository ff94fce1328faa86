"""Whole-volume inference with a 2D U-Net, and loading of trained models.

A model is a checkpoint file written by training (`model/checkpoint.pt`) or an MLflow model
URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...`) whose artifacts hold that
checkpoint. The checkpoint carries the architecture, the target kind, the modalities in
channel order and the preprocessing settings, so nothing else is needed to predict.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet.labels import regions_to_labels
from unet.model import UNet

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint.pt"


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    target: str,
    batch_size: int = 16,
    threshold: float = 0.5,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Segment a (C, X, Y, Z) volume slice by slice along Z; returns canonical labels (X, Y, Z) uint8.

    Region outputs are thresholded per region and nested into one label map (ET inside TC
    inside WT); class outputs take the argmax. Any in-plane size works (the model pads).
    """
    model.eval()
    device = torch.device(device)
    depth = image.shape[3]
    labels = np.zeros(image.shape[1:], dtype=np.uint8)
    for start in range(0, depth, batch_size):
        stop = min(start + batch_size, depth)
        batch = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image[..., start:stop]), 3, 0)))
        batch = batch.to(device=device, dtype=torch.float32)  # (B, C, X, Y)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            logits = model(batch)
        logits = logits.float()
        if target == "regions":
            regions = (torch.sigmoid(logits) > threshold).cpu().numpy()  # (B, 3, X, Y)
            predicted = regions_to_labels(np.moveaxis(regions, 0, -1))  # (X, Y, B)
        else:
            predicted = np.moveaxis(logits.argmax(dim=1).cpu().numpy().astype(np.uint8), 0, -1)
        labels[..., start:stop] = predicted
    return labels


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Build the U-Net stored in a training checkpoint; returns (model in eval mode, checkpoint metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a checkpoint file or a models:/ URI")
    # The checkpoint holds plain Python metadata next to tensors, so the full unpickler is needed;
    # only load checkpoints from a source you trust.
    state = torch.load(path, map_location=device, weights_only=False)
    if "model" not in state or "model_config" not in state:
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

    log.info("downloading %s from %s", model_ref, mlflow.get_tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_ref, dst_path=str(download_dir) if download_dir else None))
    candidates = sorted(local.rglob(CHECKPOINT_ARTIFACT))
    if not candidates:
        raise FileNotFoundError(f"model {model_ref} has no {CHECKPOINT_ARTIFACT} among its artifacts; was it logged by `unet register`?")
    return candidates[0]
