"""Time whole-volume 2D inference: `unet.inference.predict_volume` against MONAI's sliding-window inferer.

Both run the same U-Net (random weights, eval mode) on the same (C, X, Y, Z) float32 volume,
slice by slice along Z. MONAI gets the setting that makes it one pass per batch of slices:
roi_size = the whole slice, sw_batch_size = our batch size, overlap 0. Both times include
thresholding the sigmoid outputs into a label map. Prints a markdown table with the machine,
the versions and the exact command.

    .venv/bin/python benchmarks/inference.py --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch


def cpu_model() -> str:
    """Return lscpu's model name, or the platform's processor string where lscpu is missing."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@torch.no_grad()
def monai_labels(model: torch.nn.Module, image: np.ndarray, batch_size: int, threshold: float) -> np.ndarray:
    """Segment (C, X, Y, Z) with sliding_window_inference over whole slices; returns labels (X, Y, Z) uint8."""
    from monai.inferers import sliding_window_inference

    from unet.labels import regions_to_labels

    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, 3, 0)))  # (Z, C, X, Y)
    logits = sliding_window_inference(slices, roi_size=image.shape[1:3], sw_batch_size=batch_size,
                                      predictor=model, overlap=0.0)
    regions = (torch.sigmoid(logits) > threshold).numpy()  # (Z, 3, X, Y)
    return regions_to_labels(np.moveaxis(regions, 0, -1))


def seconds_per_case(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Return the median wall time per method of `repeats` calls, after one warm-up call each.

    The methods take turns within each repeat, so drift in machine load (shared CPUs, turbo
    clocks) affects both alike instead of whichever runs second.
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    from unet.inference import predict_volume
    from unet.model import UNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4,134,177,136", help="volume shape C,X,Y,Z (default: a preprocessed BraTS case)")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (both methods)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    torch.manual_seed(0)
    model = UNet(in_channels=shape[0], out_channels=3, base_channels=args.base_channels).eval()

    timings = seconds_per_case({
        "ours": lambda: predict_volume(model, image, "regions", args.batch_size),
        "monai": lambda: monai_labels(model, image, args.batch_size, 0.5),
    }, args.repeats)
    ours, theirs = timings["ours"], timings["monai"]
    agree = float(np.mean(predict_volume(model, image, "regions", args.batch_size) == monai_labels(model, image, args.batch_size, 0.5)))

    import monai

    command = shlex.join([".venv/bin/python", "benchmarks/inference.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"MONAI {monai.__version__}, Python {platform.python_version()}")
    print(f"Volume {'x'.join(map(str, shape))} float32 (random), UNet base {args.base_channels}, "
          f"batch {args.batch_size} slices, median of {args.repeats} interleaved runs after a warm-up.")
    print(f"Command: `{command}`")
    print()
    print("| method | s / case | ratio to predict_volume |")
    print("|---|---|---|")
    print(f"| `unet.inference.predict_volume` | {ours:.2f} | 1.00 |")
    print(f"| `monai.inferers.sliding_window_inference` (whole-slice ROI, overlap 0) | {theirs:.2f} | {theirs / ours:.2f} |")
    print()
    print(f"Label maps agree on {agree:.2%} of voxels.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
