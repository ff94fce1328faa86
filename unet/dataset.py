"""Training samples: random 2D slice patches or 3D volume patches from the preprocessed cases, with augmentation.

Sharding: every epoch, the sampling units (axial slices in 2D, cases in 3D) are permuted with
a generator seeded by (seed, epoch) and rank r takes every world_size-th unit from position r,
so ranks see disjoint shards that change from epoch to epoch. Foreground oversampling: the
first `round(foreground_fraction * batch_size)` samples of every batch are drawn from units
that contain tumour and centred on a tumour voxel.

Each sample is generated from a generator seeded by (seed, epoch, rank, index), so a sample
does not depend on which DataLoader worker makes it: runs are repeatable for any number of
workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from unet.labels import labels_to_regions


class PatchDataset(Dataset):
    """Random patches with (3, *patch) region or (*patch) class targets; the sampling shared by 2D and 3D.

    Subclasses list their sampling units (axial slices or whole volumes) and cut one patch
    from a unit. `len()` is the number of samples this rank draws per epoch; call
    `set_epoch` before every epoch (before the DataLoader starts its workers).
    """

    def __init__(
        self,
        case_dirs: list[Path],
        *,
        patch_size: int,
        samples_per_epoch: int,
        batch_size: int,
        foreground_fraction: float,
        target: str = "regions",
        augment: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not case_dirs:
            raise ValueError("no training cases: the split's train list is empty")
        self.case_dirs = [Path(d) for d in case_dirs]
        self.patch_size = patch_size
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.foreground_per_batch = int(round(foreground_fraction * batch_size))
        self.target = target
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.units, self.foreground = self._index()
        self._images: list[np.ndarray] | None = None
        self._labels: list[np.ndarray] | None = None
        self.set_epoch(0)

    def _index(self) -> tuple[list, list]:
        """Return (every sampling unit, the units that contain tumour)."""
        raise NotImplementedError

    def _cut(self, unit, want_tumour: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return a (C, *patch) float32 image and its (*patch) labels from one unit."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        self.shard = [self.units[i] for i in order[self.rank :: self.world_size]] or self.units
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.foreground))
        self.foreground_shard = [self.foreground[i] for i in order[self.rank :: self.world_size]] or self.foreground

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _volumes(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        # Opened lazily so that each DataLoader worker maps the files itself.
        if self._images is None:
            self._images = [np.load(d / "image.npy", mmap_mode="r") for d in self.case_dirs]
            self._labels = [np.load(d / "label.npy", mmap_mode="r") for d in self.case_dirs]
        return self._images, self._labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, index])
        want_tumour = (index % self.batch_size) < self.foreground_per_batch and bool(self.foreground_shard)
        pool = self.foreground_shard if want_tumour else self.shard
        image, label = self._cut(pool[rng.integers(len(pool))], want_tumour, rng)
        if self.augment:
            image, label = augment_patch(image, label, rng)
        if self.target == "regions":
            target = torch.from_numpy(labels_to_regions(label).astype(np.float32))
        else:
            target = torch.from_numpy(label.astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(image)), target


class AxialPatchDataset(PatchDataset):
    """Random (C, P, P) patches of axial slices; a unit is (case number, z)."""

    def _index(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        units, foreground = [], []
        for number, case_dir in enumerate(self.case_dirs):
            label = np.load(case_dir / "label.npy", mmap_mode="r")
            has_tumour = np.asarray(label).reshape(-1, label.shape[2]).any(axis=0)
            for z in range(label.shape[2]):
                units.append((number, z))
                if has_tumour[z]:
                    foreground.append((number, z))
        return units, foreground

    def _cut(self, unit: tuple[int, int], want_tumour: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._volumes()
        case, z = unit
        image = np.asarray(images[case][:, :, :, z], dtype=np.float32)  # (C, X, Y)
        label = np.asarray(labels[case][:, :, z])  # (X, Y)
        centre = None
        if want_tumour:
            xs, ys = np.nonzero(label)
            pick = rng.integers(len(xs))
            centre = (int(xs[pick]), int(ys[pick]))
        return crop_patch(image, label, self.patch_size, rng, centre)


def crop_patch(
    image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator, centre: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a (C, size, ..., size) float32 patch from (C, *spatial) and its labels, zero-padding sides shorter than `size`.

    Works for 2D slices and 3D volumes alike, and reads only the window from a memory-mapped
    array. With `centre`, the patch contains that voxel at a random offset; otherwise its
    position is uniform.
    """
    window = []
    for axis, extent in enumerate(image.shape[1:]):
        highest = max(extent - size, 0)
        if centre is None:
            start = int(rng.integers(highest + 1))
        else:
            low = max(centre[axis] - size + 1, 0)
            start = int(rng.integers(low, min(centre[axis], highest) + 1))
        window.append(slice(start, start + size))
    patch = np.asarray(image[(slice(None), *window)], dtype=np.float32)
    patch_label = np.asarray(label[tuple(window)])
    pad = [(0, size - extent) for extent in patch_label.shape]
    if any(after for _, after in pad):
        patch = np.pad(patch, [(0, 0), *pad])
        patch_label = np.pad(patch_label, pad)
    return patch, patch_label


def _rotation_scaling(spatial_dims: int, rng: np.random.Generator) -> np.ndarray:
    """Return the matrix of a rotation by +-15 degrees in the first two axes (axial plane) and a scaling of 0.9-1.1."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.9, 1.1)
    matrix = np.eye(spatial_dims)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return matrix / scale


def augment_patch(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply random flips, rotation and scaling, intensity scale and shift, and gamma to (C, *spatial) and its labels.

    Works for 2D (C, H, W) and 3D (C, D, H, W) patches. Probabilities and ranges are those
    commonly used for BraTS (nnU-Net-like, milder): flips 0.5 per axis, rotation +-15 degrees
    in the axial plane and scale 0.9-1.1 with probability 0.2, per-channel intensity scale
    0.9-1.1 and shift +-0.1 with probability 0.5, gamma 0.7-1.5 with probability 0.3.
    """
    spatial_dims = label.ndim
    for axis in range(1, spatial_dims + 1):
        if rng.random() < 0.5:
            image = np.flip(image, axis=axis)
            label = np.flip(label, axis=axis - 1)

    if rng.random() < 0.2:
        matrix = _rotation_scaling(spatial_dims, rng)
        centre = (np.array(label.shape) - 1) / 2
        offset = centre - matrix @ centre
        image = np.stack([ndimage.affine_transform(c, matrix, offset, order=1, mode="constant") for c in image])
        label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant")

    channel_axes = tuple(range(1, spatial_dims + 1))
    keep = (image.shape[0],) + (1,) * spatial_dims
    if rng.random() < 0.5:
        scales = rng.uniform(0.9, 1.1, size=keep)
        shifts = rng.uniform(-0.1, 0.1, size=keep)
        image = image * scales + shifts

    if rng.random() < 0.3:
        gamma = rng.uniform(0.7, 1.5)
        low = image.min(axis=channel_axes, keepdims=True)
        span = image.max(axis=channel_axes, keepdims=True) - low
        span = np.where(span > 0, span, 1.0)
        image = ((image - low) / span) ** gamma * span + low

    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


class VolumePatchDataset(PatchDataset):
    """Random (C, P, P, P) patches of whole preprocessed volumes, for `model.spatial_dims: 3`; a unit is a case.

    With fewer cases than ranks, every rank samples from all cases.
    """

    def _index(self) -> tuple[list[int], list[int]]:
        units = list(range(len(self.case_dirs)))
        foreground = [i for i in units if np.load(self.case_dirs[i] / "label.npy", mmap_mode="r").any()]
        return units, foreground

    def _cut(self, unit: int, want_tumour: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._volumes()
        image, label = images[unit], labels[unit]
        centre = None
        if want_tumour:
            # Pick a tumour voxel without materialising every coordinate: a random tumour slice, then a voxel in it.
            slices = np.flatnonzero(np.asarray(label).reshape(-1, label.shape[2]).any(axis=0))
            z = int(slices[rng.integers(len(slices))])
            xs, ys = np.nonzero(np.asarray(label[:, :, z]))
            pick = rng.integers(len(xs))
            centre = (int(xs[pick]), int(ys[pick]), z)
        return crop_patch(image, label, self.patch_size, rng, centre)
