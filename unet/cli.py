"""The `unet` command: ingest, validate, the dvc.yaml stages, predict and promote.

Exit codes: 0 success, 1 the work failed (bad input, a gate not passed), 2 usage error.
Errors print one line naming the file or value and the fix; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("unet")

# Set before MLflow, DVC or Prefect are imported anywhere in this process or its children.
QUIET_ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def _ingest(args: argparse.Namespace) -> int:
    from unet.ingest import ingest

    report = ingest(args.source, Path(args.dest), Path(args.spec) if args.spec else None,
                    strict=args.strict, use_dvc=not args.no_dvc, endpoint_url=args.endpoint_url, region=args.region)
    print(f"ingested {len(report.written)} case(s), {len(report.unchanged)} unchanged, {len(report.skipped)} skipped"
          + (f"; tracked in {report.dvc_file}" if report.dvc_file else ""))
    for case_id, reasons in report.skipped.items():
        for reason in reasons:
            print(f"skipped {case_id}: {reason}", file=sys.stderr)
    return 1 if report.skipped else 0


def _validate(args: argparse.Namespace) -> int:
    from unet.validate import validate_dataset

    problems = validate_dataset(Path(args.dir))
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{args.dir}: every case is valid")
    return 1 if problems else 0


def _preprocess(args: argparse.Namespace) -> int:
    from unet.config import load_params
    from unet.preprocess import run

    manifest = run(load_params(args.params), strict=args.strict)
    return 1 if manifest["skipped"] and args.strict else 0


def torchrun_command(params_path: str, extra: list[str] | None = None) -> list[str]:
    """Build the torchrun command line for `python -m unet.train` from the train block of params.

    Without train.rdzv_endpoint on one node it is `--standalone` (torchrun picks a free port);
    otherwise a c10d rendezvous whose id is $UNET_RDZV_ID (use the scheduler's job id, the same
    on every node), default `unet-train`.
    """
    from unet.config import load_params

    cfg = load_params(params_path).train
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc_per_node}",
               f"--max_restarts={cfg.max_restarts}"]
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        command.append("--standalone")
    else:
        command += [f"--nnodes={cfg.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={cfg.rdzv_endpoint}",
                    f"--rdzv_id={os.environ.get('UNET_RDZV_ID', 'unet-train')}"]
    return command + ["-m", "unet.train", "--params", params_path, *(extra or [])]


def torchrun_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for torchrun: `base` (default os.environ) with the rendezvous store kept private.

    Since torch 2.4 torchrun shares its rendezvous TCP store with the workers' process group.
    After an elastic restart, workers then read the previous incarnation's gloo addresses and
    fail with "connectFullMesh failed ... Connection refused" or hang (pytorch/pytorch#135712,
    seen here with torch 2.13 when a worker was killed). A private store per incarnation
    avoids that. A value the user set wins.
    """
    environment = dict(os.environ if base is None else base)
    environment.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return environment


def _train(args: argparse.Namespace) -> int:
    from unet.config import load_params

    endpoint = load_params(args.params).train.rdzv_endpoint
    if endpoint:
        from unet.train import check_rendezvous_port

        # Fail at once on a taken local port; torchrun would connect to the stranger and hang.
        check_rendezvous_port(endpoint)
    command = torchrun_command(args.params, ["--resume"] if args.resume else [])
    log.info("running %s", shlex.join(command))
    return subprocess.run(command, env=torchrun_environment()).returncode


def _evaluate(args: argparse.Namespace) -> int:
    if args.predictions or args.labels or args.out_dir:
        return _score_folders(args)
    from unet.config import load_params
    from unet.evaluate import run

    metrics = run(load_params(args.params))
    print_dice_table(metrics)
    return 0


def _score_folders(args: argparse.Namespace) -> int:
    from unet.config import load_params
    from unet.evaluate import score_folders
    from unet.metrics import DEFAULT_HD95_PENALTY_MM, summarize

    missing = [flag for flag, value in (("--predictions", args.predictions), ("--labels", args.labels),
                                        ("-o", args.out_dir)) if not value]
    if missing:
        print(f"error: scoring masks needs --predictions, --labels and -o together; missing {', '.join(missing)}",
              file=sys.stderr)
        return 2
    params_path = Path(args.params)
    # Outside a project there is no params.yaml, so the BraTS default penalty applies.
    penalty_mm = load_params(params_path).evaluate.hd95_penalty_mm if params_path.is_file() else DEFAULT_HD95_PENALTY_MM
    scores, skipped = score_folders(Path(args.predictions), Path(args.labels), Path(args.out_dir),
                                    args.label_convention, penalty_mm)
    for case_id, reason in skipped.items():
        print(f"skipped {case_id}: {reason}", file=sys.stderr)
    if not scores and skipped:
        print("error: no case could be scored; see the reasons above", file=sys.stderr)
        return 1
    if not scores:
        print(f"error: no case could be scored; predictions in {args.predictions} and labels in {args.labels} "
              "need matching case ids (<case_id>.nii.gz)", file=sys.stderr)
        return 1
    summary = summarize(scores)
    print_dice_table(summary, "scored")
    print(f"wrote {Path(args.out_dir) / 'per_case.csv'} and {Path(args.out_dir) / 'summary.json'}")
    return 1 if skipped else 0


def print_dice_table(metrics: dict, kind: str = "held-out") -> None:
    print(f"{'region':<8}{'Dice mean':>10}{'Dice median':>13}{'HD95 mean (mm)':>16}")
    for region in ("WT", "TC", "ET"):
        values = metrics[region]
        print(f"{region:<8}{values['dice_mean']:>10.3f}{values['dice_median']:>13.3f}{values['hd95_mean']:>16.2f}")
    print(f"mean Dice over regions: {metrics['mean_dice']:.3f} ({metrics['num_cases']} {kind} case(s))")


def _register(args: argparse.Namespace) -> int:
    from unet.config import load_params
    from unet.registry import register

    allow_dirty = args.allow_dirty or os.environ.get("UNET_ALLOW_DIRTY") == "1"
    record = register(load_params(args.params), allow_dirty=allow_dirty)
    print(f"registered {record['model_uri']}; alias {record['alias']} "
          f"{'moved to it' if record['promoted'] else 'unchanged'}: {record['reason']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from unet.config import load_params
    from unet.evaluate import predict
    from unet.tracking import configure_mlflow

    if args.model.startswith(("models:/", "runs:/")):
        configure_mlflow(load_params(args.params).tracking, Path(args.params).resolve().parent)
    failures = predict(Path(args.input), Path(args.output), args.model, Path(args.spec) if args.spec else None,
                       label_convention=args.label_convention, tta=args.tta)
    written = len(list(Path(args.output).glob("*.nii.gz"))) if Path(args.output).is_dir() else 0
    if failures and not written:
        print(f"error: no mask written; {len(failures)} case(s) skipped, see the reasons above", file=sys.stderr)
        return 1
    print(f"wrote masks to {args.output}" + (f"; {len(failures)} case(s) skipped" if failures else ""))
    return 1 if failures else 0


def _promote(args: argparse.Namespace) -> int:
    from unet.config import load_params
    from unet.promote import promote, rollback
    from unet.tracking import configure_mlflow

    if not args.rollback and args.version is None:
        print("usage error: pass --version N to promote, or --rollback to move the alias back", file=sys.stderr)
        return 2
    params = load_params(args.params)
    configure_mlflow(params.tracking, Path(args.params).resolve().parent)
    if args.rollback:
        message = rollback(args.name, args.alias)
    else:
        message = promote(args.name, args.alias, args.version, force=args.force,
                          min_improvement=params.register.min_improvement,
                          max_region_drop=params.register.max_region_drop)
    print(message)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from unet.config import load_params
    from unet.reproduce import reproduce
    from unet.tracking import configure_mlflow

    configure_mlflow(load_params(args.params).tracking, Path(args.params).resolve().parent)
    result = reproduce(args.model, root=Path(args.params).resolve().parent, tolerance=args.tolerance, keep=args.keep)
    print(f"{'':<10}{'recorded':>10}{'reproduced':>12}{'difference':>12}")
    for key, row in result["comparison"].items():
        print(f"{key:<10}{row['recorded']:>10.4f}{row['reproduced']:>12.4f}{row['difference']:>12.4f}")
    verdict = "reproduced" if result["matched"] else "NOT reproduced"
    print(f"{args.model} at commit {result['commit'][:12]}: {verdict} (tolerance {result['tolerance']})")
    return 0 if result["matched"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet", description="Brain-tumour segmentation pipeline (U-Net, DVC, MLflow, Prefect).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="bring cases from a folder or an S3 prefix into the canonical layout under DEST")
    p.add_argument("source", help="source folder, or s3://bucket/prefix to download first (cached in DEST's parent/.ingest-cache)")
    p.add_argument("dest", help="destination folder, for example data")
    p.add_argument("--spec", help="dataset spec (YAML) describing the source layout; BraTS names need none")
    p.add_argument("--strict", action="store_true", help="fail on the first invalid case instead of skipping it")
    p.add_argument("--no-dvc", action="store_true", help="do not run `dvc add DEST` afterwards")
    p.add_argument("--endpoint-url", help="S3 endpoint URL for an s3:// source, for example http://localhost:9000 "
                   "for MinIO (default: AWS_ENDPOINT_URL or the AWS endpoint of the region)")
    p.add_argument("--region", help="AWS region for an s3:// source (default: AWS_REGION, AWS_DEFAULT_REGION "
                   "or ~/.aws/config)")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("validate", help="check every case of a canonical dataset; exit 1 if any is invalid")
    p.add_argument("dir", help="dataset folder with dataset.yaml")
    p.set_defaults(func=_validate)

    for name, func, text in (("preprocess", _preprocess, "reorient, crop and normalise the ingested cases"),
                             ("train", _train, "train with torchrun as configured in params.yaml"),
                             ("evaluate", _evaluate, "segment and score the held-out cases"),
                             ("register", _register, "register the model in MLflow and gate the alias")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.set_defaults(func=func)
        if name == "preprocess":
            p.add_argument("--strict", action="store_true", help="fail on the first invalid case")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if name == "evaluate":
            p.add_argument("--predictions", help="score the masks <case_id>.nii.gz in this folder instead of "
                           "running the stage (needs --labels and -o)")
            p.add_argument("--labels", help="labels to score against: a canonical dataset folder, or a flat folder "
                           "of <case_id>.nii.gz or <case_id>_seg.nii.gz")
            p.add_argument("-o", "--out-dir", help="folder for per_case.csv and summary.json")
            p.add_argument("--label-convention", default="canonical",
                           help="label convention of the predictions and of a flat label folder, for example "
                           "brats2017 (default: canonical)")
        if name == "register":
            p.add_argument("--allow-dirty", action="store_true", help="register despite uncommitted changes (also UNET_ALLOW_DIRTY=1); the diff is logged")

    p = sub.add_parser("predict", help="segment new cases with a registered model or a checkpoint")
    p.add_argument("-i", "--input", required=True, help="folder of cases (BraTS names, or a canonical dataset)")
    p.add_argument("-o", "--output", required=True, help="folder for the masks, one <case_id>.nii.gz per case")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint path")
    p.add_argument("--spec", help="dataset spec for a layout without BraTS names")
    p.add_argument("--params", default="params.yaml", help="params file with the MLflow tracking settings")
    p.add_argument("--label-convention", default="auto",
                   help="label convention of the masks: auto (default) uses each case's own convention from its file "
                        "naming, spec or dataset.yaml, else canonical; or a name such as canonical or brats2017")
    p.add_argument("--tta", action="store_true",
                   help="test-time mirroring: average 4 in-plane flips of every slice (about 4x slower)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("promote", help="move an alias (default staging) to a model version, or roll it back")
    p.add_argument("name", help="registered model name, for example brain-tumor-unet")
    p.add_argument("--alias", default="staging", help="alias to move (default: staging)")
    p.add_argument("--version", help="model version to promote")
    p.add_argument("--force", action="store_true", help="skip the mean-Dice check")
    p.add_argument("--rollback", action="store_true", help="move the alias back to the version it held before")
    p.add_argument("--params", default="params.yaml", help="params file with the MLflow tracking settings")
    p.set_defaults(func=_promote)

    p = sub.add_parser("reproduce", help="re-run the pipeline of a registered version and compare its Dice")
    p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest Dice difference accepted (default: 0 for deterministic CPU runs, else 0.05)")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktree for inspection")
    p.add_argument("--params", default="params.yaml", help="params file with the MLflow tracking settings")
    p.set_defaults(func=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "botocore", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI turns any failure into one line and exit 1
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
