"""Training throughput on this machine: step speed, DDP scaling and data loading.

Run from the project root (about 4 minutes on 2 cores with the defaults):

    .venv/bin/python benchmarks/train.py
    .venv/bin/python benchmarks/train.py --bases 16 32 64 --steps 5   # wider models, fewer steps

Prints one markdown report with three tables:

1. images/s of one process for each base width, fp32 against bf16 autocast + channels_last
   (synthetic batches, so only the model is timed);
2. images/s over all processes for 1 and 2 DDP processes started by torchrun (gloo), and the
   scaling efficiency rate(2) / (2 * rate(1)). With N cores, 1 process uses N threads and each
   of 2 processes N/2, so both settings use the whole machine;
3. slices/s that one DataLoader worker makes with AxialPatchDataset (augmentation included),
   against what one training step consumes, and the `train.num_workers` that keeps up.

The data for table 3 is `--data` (a preprocessed folder), default `preprocessed/` when it contains
cases, else a synthetic folder of BraTS-sized volumes written to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `unet` imports when torchrun starts this file as a script

from unet.dataset import AxialPatchDataset  # noqa: E402
from unet.losses import region_loss  # noqa: E402
from unet.model import UNet  # noqa: E402


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    bf16 = torch.cpu._is_avx512_bf16_supported() if hasattr(torch.cpu, "_is_avx512_bf16_supported") else False
    return (f"{model}, {os.cpu_count()} cores, native bf16 {'yes' if bf16 else 'no'}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def time_steps(model: torch.nn.Module, batch: int, size: int, bf16: bool, warmup: int, steps: int) -> float:
    """Return images/s of forward, backward and AdamW steps on random (batch, 4, size, size) inputs."""
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 4, size, size, generator=generator).to(memory_format=memory_format)
    targets = (torch.rand(batch, 3, size, size, generator=generator) > 0.8).float()
    elapsed = 0.0
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = region_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            elapsed += time.perf_counter() - started
    return steps * batch / elapsed


def precision_table(args: argparse.Namespace) -> tuple[list[str], dict[int, float]]:
    rows = ["| base | fp32 images/s | bf16 + channels_last images/s | speed-up |", "|---:|---:|---:|---:|"]
    bf16_rates = {}
    for base in args.bases:
        rates = []
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = UNet(4, 3, base, "bilinear", spatial_dims=2)
            rates.append(time_steps(model, args.batch, args.size, bf16, args.warmup, args.steps))
        bf16_rates[base] = rates[1]
        rows.append(f"| {base} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |")
        print(f"  base {base}: fp32 {rates[0]:.1f}, bf16 {rates[1]:.1f} images/s", file=sys.stderr, flush=True)
    return rows, bf16_rates


def ddp_worker(args: argparse.Namespace) -> None:
    """Runs under torchrun: time DDP steps and let rank 0 print the total rate as JSON."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(UNet(4, 3, args.ddp_base, "bilinear", spatial_dims=2))
        rate = time_steps(model, args.batch, args.size, True, args.warmup, args.steps)
        total = torch.tensor([rate], dtype=torch.float64)
        dist.all_reduce(total)
        if dist.get_rank() == 0:
            print(json.dumps({"images_per_s": float(total), "threads": torch.get_num_threads()}), flush=True)
    finally:
        dist.destroy_process_group()


def ddp_table(args: argparse.Namespace) -> list[str]:
    """Time DDP with 1 and 2 single-thread processes, and 1 process using every core for comparison.

    Scaling efficiency compares processes with equal resources: the 2-process total against
    twice one single-thread process. One process with all cores' threads shows what a user
    gets without DDP on the same machine.
    """
    cores = os.cpu_count() or 1
    rows = ["| processes | threads each | images/s (all processes) | scaling efficiency |", "|---:|---:|---:|---:|"]
    single = None
    for processes, threads in ((1, 1), (2, 1), (1, cores)):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(Path(__file__).resolve()), "--ddp-worker", "--ddp-base", str(args.ddp_base),
                   "--batch", str(args.batch), "--size", str(args.size), "--warmup", str(args.warmup),
                   "--steps", str(args.steps)]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = str(threads)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            raise RuntimeError(f"torchrun with {processes} process(es) failed (exit {result.returncode}): "
                               f"{result.stderr.strip().splitlines()[-1:]}")
        measured = json.loads(lines[-1])
        single = single or measured["images_per_s"]
        efficiency = f"{measured['images_per_s'] / (processes * single):.0%}" if threads == 1 else "(reference)"
        rows.append(f"| {processes} | {measured['threads']} | {measured['images_per_s']:.1f} | {efficiency} |")
        print(f"  {processes} DDP process(es) x {threads} thread(s): {measured['images_per_s']:.1f} images/s",
              file=sys.stderr, flush=True)
    return rows


def synthetic_cases(folder: Path, cases: int = 2, shape: tuple[int, int, int] = (140, 170, 136)) -> list[Path]:
    """BraTS-sized preprocessed cases: normalised noise and an ellipsoid tumour with labels 1, 2, 3."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    dirs = []
    for number in range(cases):
        case = folder / f"synthetic_{number}"
        case.mkdir(parents=True)
        radius = np.sqrt(((grid / np.array([0.3, 0.25, 0.3])[:, None, None, None]) ** 2).sum(axis=0))
        label = np.select([radius < 0.3, radius < 0.6, radius < 1.0], [3, 1, 2], 0).astype(np.uint8)
        np.save(case / "image.npy", rng.standard_normal((4, *shape), dtype=np.float32))
        np.save(case / "label.npy", label)
        dirs.append(case)
    return dirs


def loader_table(args: argparse.Namespace, consumed: float, scratch: Path) -> tuple[list[str], str]:
    data = Path(args.data) if args.data else ROOT / "preprocessed"
    case_dirs = sorted(d for d in data.iterdir() if (d / "image.npy").is_file()) if data.is_dir() else []
    source = f"{len(case_dirs)} preprocessed case(s) in {data}"
    if not case_dirs:
        case_dirs = synthetic_cases(scratch)
        source = f"{len(case_dirs)} synthetic 4x140x170x136 cases"
    samples = args.loader_samples
    dataset = AxialPatchDataset(case_dirs, patch_size=args.size, samples_per_epoch=samples, batch_size=args.batch,
                                foreground_fraction=0.5, seed=0)
    dataset.set_epoch(1)
    dataset[0]  # open the memory maps outside the timing
    started = time.perf_counter()
    for index in range(samples):
        dataset[index]
    rate = samples / (time.perf_counter() - started)
    rows = ["| one worker, slices/s | one step consumes, slices/s | workers per process to keep up |",
            "|---:|---:|---:|",
            f"| {rate:.1f} | {consumed:.1f} | {max(1, math.ceil(consumed / rate))} |"]
    print(f"  DataLoader worker: {rate:.1f} slices/s", file=sys.stderr, flush=True)
    return rows, source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", type=int, nargs="+", default=[16, 32], help="base widths to time (default: 16 32)")
    parser.add_argument("--size", type=int, default=128, help="patch side (default: 128)")
    parser.add_argument("--batch", type=int, default=8, help="slices per process and step (default: 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--ddp-base", type=int, default=16, help="base width for the DDP table (default: 16)")
    parser.add_argument("--data", help="preprocessed folder for the DataLoader table (default: preprocessed/)")
    parser.add_argument("--loader-samples", type=int, default=200, help="slices drawn for the DataLoader table")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return 0

    command = shlex.join(["python", "benchmarks/train.py", *sys.argv[1:]])
    # Other work on the machine distorts every number; the load averages show whether it was quiet.
    load_before = os.getloadavg()[0]
    print(f"timing on {machine()}", file=sys.stderr, flush=True)
    precision_rows, bf16_rates = precision_table(args)
    ddp_rows = ddp_table(args)
    with tempfile.TemporaryDirectory() as scratch:
        consumed = bf16_rates.get(args.ddp_base, next(iter(bf16_rates.values())))
        loader_rows, source = loader_table(args, consumed, Path(scratch))

    load_after = os.getloadavg()[0]
    print(f"Machine: {machine()}; 1-minute load average {load_before:.1f} before, {load_after:.1f} after\n")
    print(f"Command: `{command}` ({args.size}x{args.size} patches, batch {args.batch} per "
          f"process, {args.warmup} warm-up + {args.steps} timed steps, AdamW, Dice + BCE on 3 regions)\n")
    print("Training step, one process:\n")
    print("\n".join(precision_rows))
    print(f"\nDDP over gloo started by torchrun --standalone, base {args.ddp_base}, bf16 + channels_last:\n")
    print("\n".join(ddp_rows))
    print(f"\nData loading: AxialPatchDataset on {source}, {args.size}x{args.size} patches, half centred on "
          f"tumour, augmentation on; consumption is the bf16 rate of base {args.ddp_base if args.ddp_base in bf16_rates else args.bases[0]} "
          "from the first table:\n")
    print("\n".join(loader_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
