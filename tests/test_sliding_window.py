import numpy as np
import pytest
import torch

from unet.dataset import VolumePatchDataset, augment_patch, crop_patch
from unet.model import UNet
from unet.sliding_window import gaussian_weights, patch_starts, sliding_window_probabilities


@pytest.mark.parametrize("size,patch,overlap,expected", [
    (64, 64, 0.5, [0]),
    (40, 64, 0.5, [0]),
    (128, 64, 0.5, [0, 32, 64]),
    (100, 64, 0.5, [0, 18, 36]),
    (100, 64, 0.0, [0, 36]),
    (200, 64, 0.25, [0, 45, 91, 136]),
])
def test_patch_starts(size, patch, overlap, expected):
    assert patch_starts(size, patch, overlap) == expected


def test_patch_starts_respect_overlap():
    starts = patch_starts(300, 64, 0.5)
    steps = np.diff(starts)
    assert starts[0] == 0
    assert starts[-1] == 300 - 64
    assert steps.max() <= 32


def test_gaussian_weights_peak_at_centre():
    weights = gaussian_weights(16, 3)
    assert weights.shape == (16, 16, 16)
    assert float(weights.max()) == pytest.approx(1.0, abs=0.01)
    assert float(weights[7, 7, 7]) > float(weights[0, 0, 0])
    assert float(weights.min()) >= 1e-3


class ConstantModel(torch.nn.Module):
    """Outputs logit 0 everywhere except +10 in channel 0: probabilities are then known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((x.shape[0], 3, *x.shape[2:]))
        logits[:, 0] = 10.0
        return logits


def test_sliding_window_blending_is_a_weighted_average():
    # Every patch predicts the same probabilities, so any weighted average must return them exactly.
    image = np.random.default_rng(0).normal(size=(2, 40, 37, 50)).astype(np.float32)
    probabilities = sliding_window_probabilities(ConstantModel(), image, "regions", patch_size=16, overlap=0.5)
    assert probabilities.shape == (3, 40, 37, 50)
    assert np.allclose(probabilities[0], 1 / (1 + np.exp(-10)), atol=1e-6)
    assert np.allclose(probabilities[1], 0.5, atol=1e-6)


def test_sliding_window_smaller_than_patch():
    model = UNet(2, 3, base_channels=2, spatial_dims=3).eval()
    image = np.zeros((2, 10, 12, 9), dtype=np.float32)
    assert sliding_window_probabilities(model, image, "regions", patch_size=16).shape == (3, 10, 12, 9)


def test_crop_patch_3d_contains_centre():
    rng = np.random.default_rng(1)
    image = np.zeros((1, 50, 40, 30), dtype=np.float32)
    label = np.zeros((50, 40, 30), dtype=np.uint8)
    label[45, 5, 29] = 3
    patch, patch_label = crop_patch(image, label, 16, rng, centre=(45, 5, 29))
    assert patch.shape == (1, 16, 16, 16)
    assert patch_label.sum() == 3


def test_crop_patch_pads_small_volume():
    patch, patch_label = crop_patch(np.ones((2, 5, 20, 7)), np.ones((5, 20, 7), dtype=np.uint8), 16,
                                    np.random.default_rng(0))
    assert patch.shape == (2, 16, 16, 16)
    assert patch_label.sum() == 5 * 16 * 7


def test_augment_patch_3d_keeps_shapes_and_labels():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 16, 16, 16)).astype(np.float32)
    label = rng.integers(0, 4, size=(16, 16, 16)).astype(np.uint8)
    for _ in range(10):
        new_image, new_label = augment_patch(image, label, rng)
        assert new_image.shape == image.shape
        assert set(np.unique(new_label)) <= {0, 1, 2, 3}


def test_volume_dataset_foreground_patches(tmp_path):
    for number in range(2):
        case = tmp_path / f"case{number}"
        case.mkdir()
        np.save(case / "image.npy", np.random.default_rng(number).normal(size=(4, 40, 40, 30)).astype(np.float32))
        label = np.zeros((40, 40, 30), dtype=np.uint8)
        label[30:34, 5:9, 20:23] = 2
        np.save(case / "label.npy", label)
    dataset = VolumePatchDataset(sorted(tmp_path.iterdir()), patch_size=16, samples_per_epoch=8, batch_size=4,
                                 foreground_fraction=0.5, augment=False)
    image, target = dataset[0]
    assert image.shape == (4, 16, 16, 16)
    assert target.shape == (3, 16, 16, 16)
    assert float(target[0].sum()) > 0  # the first half of each batch is centred on tumour
