import pytest
import torch

from unet.model import UNet, count_parameters


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
@pytest.mark.parametrize("in_channels,out_channels", [(1, 3), (2, 4), (4, 3)])
@pytest.mark.parametrize("height,width", [(16, 16), (32, 48), (37, 51), (1, 1), (240, 17)])
def test_unet_2d_output_shape(upsampling, in_channels, out_channels, height, width):
    model = UNet(in_channels, out_channels, base_channels=4, upsampling=upsampling).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, height, width))
    assert logits.shape == (2, out_channels, height, width)


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
@pytest.mark.parametrize("size", [(16, 16, 16), (17, 20, 33)])
def test_unet_3d_output_shape(upsampling, size):
    model = UNet(4, 3, base_channels=2, upsampling=upsampling, spatial_dims=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 4, *size))
    assert logits.shape == (1, 3, *size)


def test_unet_odd_size_matches_manual_padding():
    # forward() pads the right/bottom sides with zeros and crops the top-left corner back,
    # so a 30x27 input gives the top-left 30x27 of the logits of its zero-padded 32x32 version.
    torch.manual_seed(0)
    model = UNet(4, 3, base_channels=4).eval()
    x = torch.randn(1, 4, 30, 27)
    padded = torch.nn.functional.pad(x, (0, 5, 0, 2))
    with torch.no_grad():
        direct = model(x)
        manual = model(padded)[..., :30, :27]
    assert torch.allclose(direct, manual, atol=1e-6)


def _double_conv(cin: int, cout: int) -> int:
    # Two bias-free 3x3 convs, each followed by BatchNorm (weight and bias per channel).
    return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout


def expected_parameters(in_channels: int, out_channels: int, base: int, upsampling: str) -> int:
    c = [base * 2**level for level in range(5)]
    total = _double_conv(in_channels, c[0])
    total += sum(_double_conv(c[i], c[i + 1]) for i in range(4))
    for level in (3, 2, 1, 0):
        below, skip = c[level + 1], c[level]
        if upsampling == "transpose":
            total += below * (below // 2) * 4 + below // 2  # 2x2 transposed conv with bias
            total += _double_conv(below // 2 + skip, skip)
        else:
            total += _double_conv(below + skip, skip)
    return total + c[0] * out_channels + out_channels  # 1x1 output conv with bias


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
def test_unet_parameter_count_base_64(upsampling):
    model = UNet(4, 3, base_channels=64, upsampling=upsampling)
    assert count_parameters(model) == expected_parameters(4, 3, 64, upsampling)


def test_unet_parameter_count_known_value():
    # Hand-checked once: 31,038,339 for 4 inputs, 3 outputs, base 64, transposed convs.
    assert count_parameters(UNet(4, 3, base_channels=64, upsampling="transpose")) == 31_038_339


def test_unet_channel_widths_reach_sixteen_times_base():
    model = UNet(4, 3, base_channels=8)
    assert model.down4.block[1].block[3].out_channels == 128


@pytest.mark.parametrize("kwargs,message", [
    ({"upsampling": "nearest"}, "upsampling must be"),
    ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
    ({"base_channels": 0}, "must be >= 1"),
])
def test_unet_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(4, 3, **kwargs)
