"""Ingestion: bring cases from a source layout into the canonical layout of `unet.io`.

A source is described by a dataset spec (YAML), or recognised without one when it uses
BraTS file names. A spec lists groups of case folders (globs relative to SOURCE) and, per
group, a file pattern per modality, the label file, an optional brain mask and the label
convention, for example:

    name: my-dataset
    modalities: [t1c, flair]            # channel order
    split: {test: [case_07]}
    groups:
      - cases: [site_a/*]
        images: {t1c: "{case}_T1c.nii.gz", flair: "{case}_FLAIR.nii.gz"}
        label: "{case}_seg.nii.gz"
        label_convention: brats2017     # or an explicit mapping {source_value: canonical_value}

Output is deterministic: the same source files always give byte-identical files in DEST,
so `dvc add` gives the same data.dvc hash on every machine. Modality files are copied
byte for byte (gzip-compressed first when the source is `.nii`); label maps are rewritten
in canonical labels and brain masks as uint8 0/1, both with the source's geometry.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from unet.decathlon import is_decathlon, split_to_staging
from unet.io import CaseFiles, DatasetInfo, load_volume, read_dataset, save_like, write_bytes_atomic, write_dataset
from unet.labels import get_convention
from unet.tools import dvc_command

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# File-name suffixes of the layouts recognised without a spec.
BRATS2021_SUFFIXES = {"t1": "_t1", "t1c": "_t1ce", "t2": "_t2", "flair": "_flair", "label": "_seg"}
BRATS2023_SUFFIXES = {"t1": "-t1n", "t1c": "-t1c", "t2": "-t2w", "flair": "-t2f", "label": "-seg"}


class IngestError(RuntimeError):
    """Raised for a problem that stops the whole ingestion (bad spec, bad source, --strict)."""


@dataclass
class DatasetSpec:
    name: str
    modalities: list[str]
    split: dict[str, list[str]]
    groups: list[dict[str, Any]]
    label_convention: str | None = None
    """Convention shared by every group (set by a recognised layout even without label files); None if mixed."""


@dataclass
class IngestReport:
    written: list[str]
    unchanged: list[str]
    skipped: dict[str, list[str]]
    dvc_file: Path | None = None


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_spec(path: Path) -> DatasetSpec:
    """Read and check a dataset spec; raises IngestError naming the file and the key to fix."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise IngestError(f"cannot read dataset spec {path}: {error}") from error
    for key in ("name", "modalities", "groups"):
        if key not in raw:
            raise IngestError(f"dataset spec {path}: missing key '{key}'")
    modalities = [str(m) for m in raw["modalities"]]
    for number, group in enumerate(raw["groups"], start=1):
        missing = [key for key in ("cases", "images") if key not in group]
        if missing:
            raise IngestError(f"dataset spec {path}: group {number} lacks '{missing[0]}'")
        absent = [m for m in modalities if m not in group["images"]]
        if absent:
            raise IngestError(f"dataset spec {path}: group {number} has no file pattern for modality '{absent[0]}'")
        if "label" in group and "label_convention" not in group:
            raise IngestError(
                f"dataset spec {path}: group {number} has a label but no label_convention; "
                "name one (brats2017, brats2023, brats2015, decathlon, binary) or give an explicit mapping"
            )
        if "label_convention" in group:
            try:
                get_convention(group["label_convention"])
            except ValueError as error:
                raise IngestError(f"dataset spec {path}: group {number}: {error}") from error
    split = {str(k): [str(c) for c in v] for k, v in (raw.get("split") or {}).items()}
    named = {group["label_convention"] for group in raw["groups"] if isinstance(group.get("label_convention"), str)}
    shared = named.pop() if len(named) == 1 and all("label_convention" in g for g in raw["groups"]) else None
    return DatasetSpec(name=str(raw["name"]), modalities=modalities, split=split, groups=list(raw["groups"]),
                       label_convention=shared)


def _match_one(folder: Path, pattern: str, case: str, what: str) -> Path | None:
    matches = sorted(glob.glob(str(folder / pattern.format(case=case))))
    if len(matches) > 1:
        raise IngestError(f"{folder}: pattern '{pattern}' for {what} matches {len(matches)} files; make it specific")
    return Path(matches[0]) if matches else None


def resolve_spec(spec: DatasetSpec, source: Path) -> list[CaseFiles]:
    """List the cases a spec describes under `source`; a file that is missing is left as a path that does not exist."""
    cases: list[CaseFiles] = []
    for group in spec.groups:
        patterns = group["cases"] if isinstance(group["cases"], list) else [group["cases"]]
        folders = sorted({Path(p) for pattern in patterns for p in glob.glob(str(source / pattern)) if Path(p).is_dir()})
        if not folders:
            raise IngestError(f"no case folder under {source} matches {patterns}; check SOURCE and the spec's 'cases'")
        for folder in folders:
            case = folder.name
            case_id = str(group.get("case_id", "{case}")).format(case=case)
            images = {}
            for modality in spec.modalities:
                pattern = group["images"][modality]
                images[modality] = _match_one(folder, pattern, case, modality) or folder / pattern.format(case=case)
            label = mask = None
            if "label" in group:
                label = _match_one(folder, group["label"], case, "label") or folder / group["label"].format(case=case)
            if "mask" in group:
                mask = _match_one(folder, group["mask"], case, "mask") or folder / group["mask"].format(case=case)
            convention = get_convention(group["label_convention"]) if label is not None else None
            cases.append(CaseFiles(case_id, images, label, mask, convention))
    return cases


def detect_spec(source: Path) -> DatasetSpec:
    """Recognise BraTS 2017-2021 (`<case>_t1ce`) or BraTS 2023+ (`<case>-t1n`) file names under `source`."""
    for suffixes, convention, name in (
        (BRATS2021_SUFFIXES, "brats2017", "BraTS 2017-2021 names"),
        (BRATS2023_SUFFIXES, "brats2023", "BraTS 2023+ names"),
    ):
        probe = suffixes["t1c"]
        hits = sorted(glob.glob(str(source / "**" / f"*{probe}.nii*"), recursive=True))
        if not hits:
            continue
        roots = sorted({str(Path(hit).parent.relative_to(source)) for hit in hits})
        images = {m: f"{{case}}{suffixes[m]}.nii*" for m in ("t1", "t1c", "t2", "flair")}
        group: dict[str, Any] = {"cases": roots, "images": images}
        if glob.glob(str(source / "**" / f"*{suffixes['label']}.nii*"), recursive=True):
            group["label"] = f"{{case}}{suffixes['label']}.nii*"
            group["label_convention"] = convention
        log.info("recognised %s in %s (%d cases)", name, source, len(roots))
        return DatasetSpec(name=source.name, modalities=["t1", "t1c", "t2", "flair"], split={}, groups=[group],
                           label_convention=convention)
    raise IngestError(
        f"{source}: no BraTS-named files (<case>_t1ce.nii.gz or <case>-t1c.nii.gz) found; "
        "describe the layout in a dataset spec and pass it with --spec"
    )


def _decathlon_spec(source: Path, staging: Path) -> DatasetSpec:
    """Split a Decathlon folder's 4D images into `staging` and describe the result as a spec."""
    try:
        modalities, labelled = split_to_staging(source, staging)
    except ValueError as error:
        raise IngestError(str(error)) from error
    group: dict[str, Any] = {"cases": ["*"], "images": {m: f"{{case}}_{m}.nii.gz" for m in modalities}}
    if labelled:
        group["label"] = "{case}_seg.nii.gz"
        group["label_convention"] = "decathlon"
    log.info("recognised the Decathlon layout in %s (channels %s)", source, ", ".join(modalities))
    return DatasetSpec(name=source.name, modalities=modalities, split={}, groups=[group], label_convention="decathlon")


def _copy_image(source: Path, target: Path) -> None:
    if source.name.endswith(".gz"):
        write_bytes_atomic(source.read_bytes(), target)
    else:
        write_bytes_atomic(gzip.compress(source.read_bytes(), compresslevel=6, mtime=0), target)


def _source_record(case: CaseFiles, source: Path, objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Describe each source file of a case; `objects` adds the S3 ETag of files staged from S3."""
    files = {**case.images, **({"label": case.label} if case.label else {}), **({"mask": case.mask} if case.mask else {})}
    record = {}
    for role, path in files.items():
        relative = path.relative_to(source).as_posix()
        record[role] = {"source": relative, "sha256": sha256_file(path), "size": path.stat().st_size}
        if relative in objects:
            record[role]["etag"] = objects[relative]["etag"]
    return record


def _stage_s3_source(
    uri: str, dest: Path, cache_dir: Path | None, endpoint_url: str | None, region: str | None
) -> tuple[str, Path, dict[str, dict[str, Any]]]:
    """Download the objects under `uri` into <cache_dir>/<bucket>/<prefix>; return (normalised URI, that folder, objects).

    The default cache_dir is <DEST parent>/.ingest-cache, outside DEST so that `dvc add DEST`
    does not version the raw download. The staging folder's name, which a source without a
    spec gives the dataset, thus comes from the URI alone.
    """
    from unet.s3 import download_prefix, parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    staging = (Path(cache_dir) if cache_dir else Path(dest).resolve().parent / ".ingest-cache") / bucket / prefix
    objects = download_prefix(uri, staging, endpoint_url=endpoint_url, region=region)
    return f"s3://{bucket}/{prefix}", staging, objects


def write_case(case: CaseFiles, dest: Path) -> None:
    """Write one validated case into DEST/<case_id>/ in the canonical layout."""
    folder = dest / case.case_id
    staging = dest / f".{case.case_id}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for modality, path in case.images.items():
        _copy_image(path, staging / f"{case.case_id}_{modality}.nii.gz")
    if case.label is not None:
        labels, reference = load_volume(case.label, dtype=np.float64)
        canonical = case.label_convention.to_canonical(labels, case.case_id)
        save_like(canonical, reference, staging / f"{case.case_id}_seg.nii.gz", np.uint8)
    if case.mask is not None:
        mask, reference = load_volume(case.mask)
        save_like((mask > 0.5).astype(np.uint8), reference, staging / f"{case.case_id}_mask.nii.gz", np.uint8)
    # Swap the finished folder in, so an interrupted run never leaves a half-written case behind.
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _find_dvc_root(path: Path) -> Path | None:
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def track_with_dvc(dest: Path) -> Path | None:
    """`dvc add DEST` (and `dvc push` when a default remote is set); returns the .dvc file or None outside a DVC repo."""
    root = _find_dvc_root(dest)
    if root is None:
        log.info("%s is not inside a DVC repository; skipping dvc add", dest)
        return None
    subprocess.run(dvc_command("add", "--quiet", str(dest.resolve())), cwd=root, check=True)
    remote = subprocess.run(dvc_command("remote", "default"), cwd=root, capture_output=True, text=True)
    if remote.returncode == 0 and remote.stdout.strip():
        log.info("pushing %s to DVC remote %s", dest, remote.stdout.strip())
        subprocess.run(dvc_command("push", "--quiet", f"{dest.resolve()}.dvc"), cwd=root, check=True)
    return dest.resolve().with_name(dest.name + ".dvc")


def ingest(
    source: str | Path,
    dest: Path,
    spec_path: Path | None = None,
    *,
    strict: bool = False,
    use_dvc: bool = True,
    cache_dir: Path | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> IngestReport:
    """Validate every case under `source` and write the valid ones to `dest` in the canonical layout.

    `source` is a folder or an s3://bucket/prefix URI. The objects under a URI are first
    downloaded into <cache_dir>/<bucket>/<prefix> (default cache_dir: <DEST parent>/.ingest-cache),
    with `endpoint_url` and `region` overriding the AWS settings, and provenance.json then also
    records the URI and each file's ETag.
    A case whose source files have the same hashes as at its last ingestion is left as it is.
    An invalid case is skipped with its problems recorded in DEST/provenance.json, unless
    `strict`, which raises IngestError at the first invalid case.
    """
    from unet.validate import validate_case

    source_uri = None
    objects: dict[str, dict[str, Any]] = {}
    if isinstance(source, str) and source.startswith("s3://"):
        source_uri, source, objects = _stage_s3_source(source, dest, cache_dir, endpoint_url, region)
    source = Path(source)
    if not source.is_dir():
        raise IngestError(f"source folder {source} not found; pass an existing folder or an s3:// URI")
    if spec_path is None and is_decathlon(source):
        staging = (Path(cache_dir) if cache_dir else dest.parent / ".ingest-cache") / "decathlon" / source.name
        spec = _decathlon_spec(source, staging)
        source = staging
    else:
        spec = load_spec(spec_path) if spec_path else detect_spec(source)
    cases = resolve_spec(spec, source)
    seen: dict[str, Path] = {}
    for case in cases:
        if not CASE_ID_PATTERN.match(case.case_id):
            raise IngestError(f"case id '{case.case_id}' is not a plain file name; rename the folder or set case_id in the spec")
        first_image = next(iter(case.images.values()))
        if case.case_id in seen:
            raise IngestError(f"case id '{case.case_id}' appears twice ({seen[case.case_id].parent} and {first_image.parent})")
        seen[case.case_id] = first_image

    dest.mkdir(parents=True, exist_ok=True)
    provenance_path = dest / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    recorded: dict[str, Any] = provenance.get("cases", {})
    previous = read_dataset(dest) if (dest / "dataset.yaml").is_file() else None
    if previous is not None and previous.modalities != spec.modalities:
        raise IngestError(
            f"{dest} contains a dataset with modalities {previous.modalities}, the source has {spec.modalities}; "
            "ingest into an empty folder"
        )

    report = IngestReport(written=[], unchanged=[], skipped={})
    for case in cases:
        problems = validate_case(case)
        if problems:
            reasons = [str(problem) for problem in problems]
            if strict:
                raise IngestError(reasons[0])
            for reason in reasons:
                log.error("skipping case %s: %s", case.case_id, reason)
            report.skipped[case.case_id] = reasons
            continue
        record = {
            "label_convention": case.label_convention.name if case.label_convention else None,
            "files": _source_record(case, source, objects),
        }
        if recorded.get(case.case_id) == record and (dest / case.case_id).is_dir():
            report.unchanged.append(case.case_id)
            continue
        write_case(case, dest)
        recorded[case.case_id] = record
        report.written.append(case.case_id)
        log.info("ingested %s", case.case_id)

    case_ids = sorted(set(recorded) & {p.name for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")})
    split = {key: [c for c in ids if c in case_ids] for key, ids in (previous.split if previous else {}).items()}
    split.update({key: [c for c in ids if c in case_ids] for key, ids in spec.split.items()})
    conventions = {case_id: recorded[case_id]["label_convention"] for case_id in case_ids if recorded[case_id]["label_convention"]}
    write_dataset(dest, DatasetInfo(spec.name, spec.modalities, case_ids, split, conventions))
    provenance = {
        "dataset": spec.name,
        "cases": {case_id: recorded[case_id] for case_id in case_ids},
        "skipped": report.skipped,
    }
    if source_uri is not None:
        provenance["source_uri"] = source_uri
    write_bytes_atomic((json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode(), provenance_path)

    if use_dvc:
        report.dvc_file = track_with_dvc(dest)
    return report
