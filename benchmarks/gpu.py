"""GPU training throughput of the 2D U-Net: images/s and model FLOP utilisation (MFU) in bf16.

For each base width, runs warm-up steps and then timed training steps (forward, Dice + BCE
loss, backward, AdamW step) on random 4-channel batches with channels_last and bf16
autocast, and prints a markdown table. FLOPs per image come from
torch.utils.flop_counter.FlopCounterMode over one forward and backward pass; MFU is achieved
FLOP/s divided by the GPU's dense bf16 peak (looked up from its name, or --peak-tflops).

Reference point: NVIDIA's optimised 2D U-Net for BraTS reaches about 1,200 images/s on one
A100 with mixed precision.

Usage: benchmarks/gpu.sh (wraps this with a time limit), or
    python benchmarks/gpu.py --bases 64 128 --size 192 --batch 64
    python benchmarks/gpu.py --device cpu --bases 8 --size 64 --batch 2 --steps 2   # smoke check without a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from unet.losses import region_loss
from unet.model import UNet

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets (without sparsity).
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_image(model: torch.nn.Module, batch: torch.Tensor, targets: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16):
            logits = model(batch)
        region_loss(logits, targets).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.shape[0]


def measure(base: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model = UNet(4, 3, base_channels=base).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randn(args.batch, 4, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    targets = (torch.rand(args.batch, 3, args.size, args.size, device=device) > 0.9).float()
    flops = flops_per_image(model, batch, targets)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(batch)
        loss = region_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    images_per_s = args.steps * args.batch / seconds
    return {"images_per_s": images_per_s, "gflops_per_image": flops / 1e9, "tflops": images_per_s * flops / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", type=int, nargs="+", default=[64, 128], help="U-Net base widths to measure")
    parser.add_argument("--size", type=int, default=192, help="side of the square input in pixels")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device for MFU")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    peak = peak_tflops(device, args.peak_tflops)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Device: {name}; torch {torch.__version__}; input {args.batch}x4x{args.size}x{args.size}, bf16 autocast, "
          f"channels_last, {args.warmup} warm-up + {args.steps} timed steps")
    print("| base | images/s | GFLOP per image (fwd+bwd) | TFLOP/s | MFU |")
    print("|---:|---:|---:|---:|---:|")
    for base in args.bases:
        result = measure(base, args, device)
        mfu = f"{result['tflops'] / peak:.1%}" if peak else "n/a"
        print(f"| {base} | {result['images_per_s']:.0f} | {result['gflops_per_image']:.1f} | {result['tflops']:.1f} | {mfu} |")


if __name__ == "__main__":
    main()
