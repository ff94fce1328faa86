"""Distributed training of the U-Net on 2D axial patches; the entry point that torchrun starts.

Launch lines (run from the project root, next to params.yaml):

    # two CPU processes on one machine, gloo backend
    torchrun --standalone --nproc_per_node=2 -m unet.train --params params.yaml
    # one process, no torchrun
    python -m unet.train --params params.yaml
    # one node of a multi-node GPU pool, NCCL backend, c10d rendezvous (run on every node)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \
        --rdzv_id=JOB_ID --max_restarts=3 -m unet.train --params params.yaml
    # or let the CLI build the torchrun line from params.yaml (train.nnodes, train.nproc_per_node, ...)
    unet train

Rank 0 alone logs to MLflow, writes checkpoints and the training history. After a torchrun
restart (TORCHELASTIC_RESTART_COUNT > 0) training resumes from the latest checkpoint: weights,
optimiser, schedule, GradScaler, the RNG states of every rank and the MLflow run. The checkpoint
is written at the end of every epoch, so a restart repeats at most the epoch that was cut short.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from unet.config import Params, load_params
from unet.dataset import AxialPatchDataset, VolumePatchDataset
from unet.inference import segment_volume
from unet.labels import CANONICAL_LABEL_NAMES, REGION_LABELS, REGIONS, labels_to_regions
from unet.losses import class_loss, region_loss
from unet.model import UNet, count_parameters
from unet.preprocess import load_manifest

log = logging.getLogger("unet.train")

FINAL_CHECKPOINT = "checkpoint.pt"
LATEST_CHECKPOINT = "checkpoint_latest.pt"
HISTORY_FILE = "train_history.csv"


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; training cannot recover from that state."""


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistributedContext:
    """Join the process group torchrun describes in the environment, or run alone without one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1:
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, local_rank, world_size, device)


def setup_logging(context: DistributedContext) -> None:
    """Rank 0 logs at INFO; the other ranks only report warnings and errors."""
    level = logging.INFO if context.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {context.rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        # cuBLAS needs this workspace setting for deterministic matmuls on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Return the autocast dtype for `train.precision`, or None for fp32.

    `auto` picks bf16 on CUDA devices that support it, fp16 on older CUDA devices (trained
    with a GradScaler), bf16 on CPUs with native bf16 (AVX-512 BF16 or AMX), and fp32 on
    other CPUs, where fp16 and emulated bf16 are slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    if precision == "bf16" or cpu_bf16:
        return torch.bfloat16
    return None


def check_rendezvous_port(endpoint: str, default_port: int = 29400) -> None:
    """Raise ValueError when `endpoint` (host:port) names an address of this machine whose port
    another process already holds.

    torchrun would otherwise take the listener for a rendezvous store, connect to it and hang
    until the rendezvous times out. The probe binds with SO_REUSEADDR, so a port left in
    TIME_WAIT by an earlier run counts as free, as it does for torchrun. A host that is not an
    address of this machine (bind fails with EADDRNOTAVAIL) is another node's: not checked.
    """
    host, _, port_text = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", str(default_port))
    host = host.strip("[]")
    try:
        port = int(port_text)
        addresses = {info[4][0]: info[0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (ValueError, socket.gaierror) as error:
        raise ValueError(f"invalid train.rdzv_endpoint {endpoint!r} ({error}); expected host:port, "
                         "for example node0:29400") from None
    for address, family in addresses.items():
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ValueError(
                        f"rendezvous port {port} of train.rdzv_endpoint {endpoint!r} is already in use on this machine; "
                        "pick another port (train.rdzv_endpoint), or for a single node set train.nnodes: 1 with an "
                        "empty train.rdzv_endpoint to run --standalone") from None
                if error.errno != errno.EADDRNOTAVAIL:
                    raise


def build_model(params: Params, in_channels: int) -> UNet:
    out_channels = len(REGIONS) if params.model.target == "regions" else len(CANONICAL_LABEL_NAMES)
    return UNet(in_channels, out_channels, params.model.base_channels, params.model.upsampling,
                spatial_dims=params.model.spatial_dims)


def memory_format_for(params: Params) -> torch.memory_format:
    """channels_last (2D) or channels_last_3d (3D) when train.channels_last is set, else contiguous."""
    if not params.train.channels_last:
        return torch.contiguous_format
    return torch.channels_last if params.model.spatial_dims == 2 else torch.channels_last_3d


def make_optimizer(model: nn.Module, params: Params) -> torch.optim.Optimizer:
    cfg = params.train
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, params: Params) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: poly (1 - t)^0.9, cosine, or constant, over all steps of the run."""
    total = params.train.epochs * params.train.steps_per_epoch
    kind = params.train.schedule

    def factor(step: int) -> float:
        progress = min(step / total, 1.0)
        if kind == "poly":
            return (1 - progress) ** 0.9
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the plain module inside DDP and torch.compile wrappers (in any nesting order),
    so state dicts carry neither `module.` nor `_orig_mod.` prefixes."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    params: Params,
    context: DistributedContext,
    epoch: int,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
) -> float:
    """Run one epoch and return the mean loss over all ranks.

    `scaler` is enabled only for fp16 autocast; disabled, its calls pass the loss and the
    optimiser step through unchanged.
    """
    model.train()
    loss_fn = region_loss if params.model.target == "regions" else class_loss
    memory_format = memory_format_for(params)
    total, count = torch.zeros((), dtype=torch.float64), 0
    started = time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=1):
        images = images.to(context.device, memory_format=memory_format, non_blocking=True)
        targets = targets.to(context.device, non_blocking=True)
        autocast = torch.autocast(context.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            logits = model(images)
        loss = loss_fn(logits, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, step {step} (rank {context.rank}); "
                "lower train.lr or set train.precision: fp32, then restart"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if params.train.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
        # With fp16 the scaler skips the step when a gradient overflowed; the schedule still
        # advances so that it stays aligned with the step count after a resume.
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach().double().cpu()
        count += 1
        if context.is_main and (step % params.train.log_every == 0 or step == len(loader)):
            rate = step * params.train.batch_size * context.world_size / (time.perf_counter() - started)
            log.info("epoch %d step %d/%d loss %.4f lr %.2e (%.1f slices/s over all ranks)",
                     epoch, step, len(loader), loss.item(), scheduler.get_last_lr()[0], rate)
    summed = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])
    if context.world_size > 1:
        dist.all_reduce(summed)
    return float(summed[0] / summed[1])


@torch.no_grad()
def validate(
    model: nn.Module, case_dirs: list[Path], params: Params, context: DistributedContext, amp_dtype: torch.dtype | None
) -> dict[str, float]:
    """Whole-volume Dice per region on the validation cases, reduced over all ranks.

    Each rank predicts cases[rank::world_size]; every rank joins the all_reduce even with no
    case (or no tumour) of its own, so no collective is skipped. Dice is pooled over cases
    (sums of intersections and sizes), and a region empty in both is scored 1.
    """
    plain = unwrap(model)
    plain.eval()
    sums = torch.zeros(len(REGIONS), 3, dtype=torch.float64)  # intersection, prediction, target
    for case_dir in case_dirs[context.rank :: context.world_size]:
        image = np.load(case_dir / "image.npy", mmap_mode="r")
        label = np.load(case_dir / "label.npy")
        metadata = {"target": params.model.target, "threshold": params.evaluate.threshold,
                    "model_config": plain.config, "params": params.to_dict()}
        predicted = segment_volume(plain, image, metadata, params.evaluate.batch_size, context.device, amp_dtype)
        for index, (pred, true) in enumerate(zip(labels_to_regions(predicted), labels_to_regions(label))):
            sums[index, 0] += float(np.logical_and(pred, true).sum())
            sums[index, 1] += float(pred.sum())
            sums[index, 2] += float(true.sum())
    if context.world_size > 1:
        dist.all_reduce(sums)
    model.train()
    dice = {}
    for index, region in enumerate(REGIONS):
        intersection, predicted, target = sums[index].tolist()
        dice[region] = 1.0 if predicted + target == 0 else 2 * intersection / (predicted + target)
    return dice


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a killed writer leaves the previous file intact."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def model_metadata(params: Params, manifest: dict[str, Any], model: UNet) -> dict[str, Any]:
    """Return what inference needs besides the weights: architecture, target, labels and preprocessing."""
    return {
        "model_config": dict(model.config),
        "target": params.model.target,
        "regions": {region: list(REGION_LABELS[region]) for region in REGIONS},
        "labels": {str(k): v for k, v in CANONICAL_LABEL_NAMES.items()},
        "modalities": list(manifest["modalities"]),
        "preprocessing": dict(manifest["settings"]),
        "threshold": params.evaluate.threshold,
        "params": params.to_dict(),
        "data_fingerprint": data_fingerprint(manifest),
    }


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of what the training data is made of: input file hashes, preprocessing settings and split."""
    content = {
        "cases": {case_id: record.get("source_sha256") for case_id, record in manifest["cases"].items()},
        "settings": manifest["settings"],
        "split": manifest["split"],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def resume_decision(latest: Path, params: Params, manifest: dict[str, Any]) -> tuple[bool, str]:
    """Decide whether a re-run continues from `latest`: same model and train params, same data, not finished."""
    if not latest.is_file():
        return False, "no checkpoint to resume from"
    state = torch.load(latest, map_location="cpu", weights_only=False)
    saved = state.get("params", {})
    current = params.to_dict()
    for block in ("model", "train"):
        if saved.get(block) != current[block]:
            return False, f"the {block} params differ from those of {latest}"
    if state.get("data_fingerprint") != data_fingerprint(manifest):
        return False, f"the preprocessed data differs from that of {latest}"
    if state["epoch"] >= params.train.epochs:
        return False, f"{latest} already completed all {params.train.epochs} epochs"
    return True, f"{latest} stopped after epoch {state['epoch']} of {params.train.epochs} with the same params and data"


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(context: DistributedContext) -> list[dict[str, Any]]:
    """Gather the RNG states of all ranks, indexed by rank. This is a collective, so every rank must call it."""
    state = _rng_state(context.device)
    if context.world_size == 1:
        return [state]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, state)
    return states


def _agree(context: DistributedContext, value: Any) -> Any:
    """Return rank 0's value on every rank, because ranks on different nodes may see different files."""
    if context.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Tracker:
    """MLflow logging for rank 0; every method is a no-op on the other ranks."""

    def __init__(self, params: Params, context: DistributedContext, out_dir: Path, resume: bool, run_id: str | None):
        """Start a new MLflow run or, when resuming from a checkpoint, continue its run: `run_id`
        as recorded in the checkpoint, else the one in out_dir/run.json."""
        self.active = context.is_main
        self.run_id: str | None = None
        if not self.active:
            return
        import mlflow

        from unet.lineage import environment
        from unet.tracking import configure_mlflow, flatten, read_run_file, write_run_file

        self.mlflow = mlflow
        experiment_id = configure_mlflow(params.tracking)
        if not resume:
            run_id = None
        elif run_id is None and (out_dir / "run.json").is_file():
            run_id = read_run_file(out_dir)["run_id"]
        try:
            run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id)
        except mlflow.exceptions.MlflowException as error:
            # The run was deleted or belongs to another tracking store, so training continues in a new run.
            log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, str(error).splitlines()[0])
            run_id = None
            run = mlflow.start_run(experiment_id=experiment_id)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(params.to_dict()))
            mlflow.set_tags({f"env.{k}": str(v) for k, v in environment().items()}
                            | {"world_size": str(context.world_size), "device": str(context.device)})
        else:
            mlflow.set_tag("resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
        # Evaluate and register find the training run through run.json.
        write_run_file(out_dir, run.info.run_id, experiment_id)
        log.info("MLflow run %s (experiment %s, tracking %s)", run.info.run_id, experiment_id, mlflow.get_tracking_uri())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self.mlflow.log_metrics(metrics, step=step)

    def log_epochs(self, history: list[dict[str, float]], only_missing: bool = False) -> None:
        """Log history rows as metrics at step = epoch; with only_missing, skip epochs the run has.

        A worker can die between the checkpoint of an epoch and its metrics; on resume the
        checkpoint's history fills that gap without logging any epoch twice.
        """
        if not self.active:
            return
        logged = set()
        if only_missing:
            client = self.mlflow.MlflowClient()
            logged = {metric.step for metric in client.get_metric_history(self.run_id, "train_loss")}
        for row in history:
            if row["epoch"] not in logged:
                self.log_metrics({k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)}, step=row["epoch"])

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.mlflow.end_run(status=status)


def train(params: Params, context: DistributedContext, resume: bool = False) -> Path:
    """Train on the preprocessed cases; return the path of the final checkpoint (rank 0 writes it)."""
    cfg = params.train
    out_dir = Path(cfg.out_dir)
    report_dir = Path(params.evaluate.report_dir)
    manifest = load_manifest(Path(params.preprocess.out_dir))
    data_root = Path(params.preprocess.out_dir)
    train_dirs = [data_root / case_id for case_id in manifest["split"]["train"]]
    val_dirs = [data_root / case_id for case_id in manifest["split"]["val"]]
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        report_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed + context.rank, cfg.deterministic)
    if cfg.deterministic and context.device.type == "cuda" and cfg.compile:
        log.warning("train.compile with train.deterministic: compiled kernels are not guaranteed bit-identical across runs")
    model = build_model(params, in_channels=len(manifest["modalities"])).to(context.device)
    if context.device.type == "cuda" and context.world_size > 1:
        # SyncBatchNorm only runs on CUDA; on CPU each rank keeps its own batch statistics.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=memory_format_for(params))
    optimizer = make_optimizer(model, params)
    scheduler = make_scheduler(optimizer, params)
    amp_dtype = autocast_dtype(context.device, cfg.precision)
    # Loss scaling is needed for fp16 only; bf16 has the exponent range of fp32.
    scaler = torch.amp.GradScaler(context.device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_dice, history, run_id = 1, -1.0, [], None
    latest = out_dir / LATEST_CHECKPOINT
    if not resume and cfg.auto_resume and context.is_main and latest.is_file():
        # A re-run of the stage (for example after a cancelled flow run) continues an unfinished
        # run instead of starting over, but never mixes runs of different settings or data.
        resume, reason = resume_decision(latest, params, manifest)
        log.info("%s from %s: %s", "resuming" if resume else "starting fresh instead of resuming", latest, reason)
    # Rank 0 decides, so that all ranks start at the same epoch or none resumes.
    if _agree(context, resume and latest.is_file()):
        if not latest.is_file():
            raise FileNotFoundError(
                f"rank {context.rank} cannot read {latest}, which rank 0 resumes from; "
                "put train.out_dir on a filesystem shared by all nodes")
        state = torch.load(latest, map_location=context.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best_dice, history = state["epoch"] + 1, state["best_dice"], state["history"]
        run_id = state.get("mlflow_run_id")
        rng_states = state["rng"]
        if len(rng_states) == context.world_size:
            _restore_rng(rng_states[context.rank], context.device)
        elif context.is_main:
            # An elastic restart may change the world size; ranks then keep their fresh seeds.
            log.warning("checkpoint contains RNG states of %d rank(s), this run has %d; ranks keep seed + rank",
                        len(rng_states), context.world_size)
        log.info("resumed from %s at epoch %d", latest, start_epoch)

    wrapped: nn.Module = model
    if context.world_size > 1:
        wrapped = DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None)
    if cfg.compile:
        # Compile the DDP module, so that the compiler can overlap gradient buckets with backward.
        # Checkpoints use unwrap(model) and stay free of `_orig_mod.` prefixes.
        wrapped = torch.compile(wrapped)

    dataset_class = AxialPatchDataset if params.model.spatial_dims == 2 else VolumePatchDataset
    dataset = dataset_class(
        train_dirs, patch_size=cfg.patch_size, samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size,
        batch_size=cfg.batch_size, foreground_fraction=cfg.foreground_fraction, target=params.model.target,
        seed=cfg.seed, rank=context.rank, world_size=context.world_size,
    )
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, drop_last=True, num_workers=cfg.num_workers,
                        pin_memory=context.device.type == "cuda")

    tracker = Tracker(params, context, out_dir, resume=start_epoch > 1, run_id=run_id)
    tracker.log_epochs(history, only_missing=True)
    if context.is_main:
        log.info("settings: %d train / %d val cases, %d sampling units (%d with tumour), base_channels %d (%d parameters), "
                 "%s, %d process(es) on %s (world size %d), autocast %s%s%s, %d epochs x %d steps x batch %d",
                 len(train_dirs), len(val_dirs), len(dataset.units), len(dataset.foreground), params.model.base_channels,
                 count_parameters(model), params.model.target, context.world_size, context.device, context.world_size,
                 amp_dtype, " with GradScaler" if scaler.is_enabled() else "", ", torch.compile" if cfg.compile else "",
                 cfg.epochs, cfg.steps_per_epoch, cfg.batch_size)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            dataset.set_epoch(epoch)
            loss = train_one_epoch(wrapped, loader, optimizer, scheduler, params, context, epoch, amp_dtype, scaler)
            val_dice = validate(wrapped, val_dirs, params, context, amp_dtype) if val_dirs else {}
            mean_dice = float(np.mean(list(val_dice.values()))) if val_dice else float("nan")
            row = {"epoch": epoch, "train_loss": loss, "lr": scheduler.get_last_lr()[0],
                   **{f"val_dice_{r}": val_dice.get(r, float("nan")) for r in REGIONS}, "val_dice_mean": mean_dice,
                   "seconds": time.perf_counter() - started}
            history.append(row)
            rng_states = gather_rng_states(context)  # collective: before the rank-0 branch

            # Checkpoint before logging, so that an epoch in MLflow always has a checkpoint
            # behind it and a restart does not log the same epoch twice.
            if context.is_main:
                metadata = model_metadata(params, manifest, unwrap(model))
                improved = bool(val_dice) and mean_dice > best_dice
                best_dice = max(best_dice, mean_dice) if val_dice else best_dice
                save_checkpoint(latest, {
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "best_dice": best_dice, "history": history, "rng": rng_states, "mlflow_run_id": tracker.run_id,
                    **metadata,
                })
                # Without validation cases the last epoch's weights are the final model.
                if improved or not val_dirs:
                    save_checkpoint(out_dir / FINAL_CHECKPOINT, {"model": unwrap(model).state_dict(), "epoch": epoch,
                                                                 "val_dice": val_dice, **metadata})
                write_history(report_dir / HISTORY_FILE, history)
            tracker.log_epochs([row])
            log.info("epoch %d/%d done: loss %.4f%s (%.0f s)", epoch, cfg.epochs, loss,
                     f", val Dice {mean_dice:.3f}" if val_dice else "", row["seconds"])
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return out_dir / FINAL_CHECKPOINT


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(history[0]))
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unet.train", description="Train the U-Net (start it with torchrun for DDP).")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in train.out_dir (automatic after a torchrun restart)")
    args = parser.parse_args(argv)

    context = setup_distributed()
    setup_logging(context)
    try:
        params = load_params(args.params)
        resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        train(params, context, resume=resume)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as error:
        log.error("training failed: %s", error)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
