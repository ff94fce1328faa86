"""The U-Net (Ronneberger et al., 2015) for 2D slices or 3D patches of multi-modal MRI.

Blocks from the smallest up: DoubleConv, Down, Up, then UNet. Four down steps take the
channels from `base_channels` to 16x `base_channels`; four up steps halve them again, each
concatenating the skip connection of the matching encoder level; a 1x1 conv gives the logits.

Sizes: the four 2x2 max-pools need every spatial side to be a multiple of 16. `UNet.forward`
accepts any size: it zero-pads the right/bottom (and back) sides up to the next multiple of 16
and crops the logits back, so output and input have the same spatial size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTH = 4
SIZE_MULTIPLE = 2**DEPTH


def _layers(spatial_dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class DoubleConv(nn.Module):
    """(3x3 conv => BatchNorm => ReLU) twice; the convs carry no bias because BatchNorm follows."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, mid_channels: int | None = None):
        super().__init__()
        conv, norm, _, _ = _layers(spatial_dims)
        mid_channels = mid_channels or out_channels
        self.block = nn.Sequential(
            conv(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            norm(mid_channels),
            nn.ReLU(inplace=True),
            conv(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv: halves each spatial side."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2):
        super().__init__()
        _, _, pool, _ = _layers(spatial_dims)
        self.block = nn.Sequential(pool(2), DoubleConv(in_channels, out_channels, spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """Double each spatial side, concatenate the skip, then DoubleConv to `out_channels`.

    `upsampling="transpose"` learns the up-sampling with a 2x2 transposed conv that also halves
    the channels; `"bilinear"` (trilinear in 3D) interpolates and keeps them, so the DoubleConv
    then receives in_channels + skip_channels.
    """

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, spatial_dims: int = 2, upsampling: str = "bilinear"
    ):
        super().__init__()
        _, _, _, transposed = _layers(spatial_dims)
        if upsampling == "transpose":
            self.up: nn.Module = transposed(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels // 2 + skip_channels, out_channels, spatial_dims)
        elif upsampling == "bilinear":
            mode = "bilinear" if spatial_dims == 2 else "trilinear"
            self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=False)
            self.conv = DoubleConv(in_channels + skip_channels, out_channels, spatial_dims)
        else:
            raise ValueError(f"upsampling must be 'bilinear' or 'transpose', got {upsampling!r}")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net with four down and four up steps.

    Args:
        in_channels: number of input modalities (for example 4 for T1, T1c, T2, FLAIR).
        out_channels: 3 for the WT, TC, ET regions (sigmoid) or 4 for the canonical classes (softmax).
        base_channels: width of the first level; level i has base_channels * 2**i channels.
        upsampling: "bilinear" or "transpose".
        spatial_dims: 2 for slices (B, C, H, W), 3 for patches (B, C, D, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int = 64,
        upsampling: str = "bilinear",
        spatial_dims: int = 2,
    ):
        super().__init__()
        if in_channels < 1 or out_channels < 1 or base_channels < 1:
            raise ValueError(
                f"in_channels, out_channels and base_channels must be >= 1, got {in_channels}, {out_channels}, {base_channels}"
            )
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base_channels": base_channels,
            "upsampling": upsampling,
            "spatial_dims": spatial_dims,
        }
        conv, _, _, _ = _layers(spatial_dims)
        widths = [base_channels * 2**level for level in range(DEPTH + 1)]  # c, 2c, 4c, 8c, 16c

        self.inc = DoubleConv(in_channels, widths[0], spatial_dims)
        self.down1 = Down(widths[0], widths[1], spatial_dims)
        self.down2 = Down(widths[1], widths[2], spatial_dims)
        self.down3 = Down(widths[2], widths[3], spatial_dims)
        self.down4 = Down(widths[3], widths[4], spatial_dims)

        self.up1 = Up(widths[4], widths[3], widths[3], spatial_dims, upsampling)
        self.up2 = Up(widths[3], widths[2], widths[2], spatial_dims, upsampling)
        self.up3 = Up(widths[2], widths[1], widths[1], spatial_dims, upsampling)
        self.up4 = Up(widths[1], widths[0], widths[0], spatial_dims, upsampling)
        self.outc = conv(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_channels, *spatial) to logits (B, out_channels, *spatial), any spatial size."""
        spatial = x.shape[2:]
        padding: list[int] = []
        for size in reversed(spatial):  # F.pad takes the last axis first
            padding += [0, (-size) % SIZE_MULTIPLE]
        if any(padding):
            x = F.pad(x, padding)

        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)

        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)

        if any(padding):
            logits = logits[(..., *(slice(0, size) for size in spatial))]
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
