"""Download the objects under an S3 prefix into a local staging folder.

`unet ingest s3://bucket/prefix DEST` stages the objects with `download_prefix` and then
ingests the staging folder like any local source.

Staging is resumable. The staging folder keeps a record (`.s3-objects.json`) of the ETag and
size of every object downloaded so far, and an object whose local copy matches the listing is
not downloaded again. Each object is written to a hidden temporary file and renamed into
place. The record lists an object only after that rename, so a later run never trusts a
partial file left by an interrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotocoreConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    SSLError,
)

from unet.io import publish_temporary, write_bytes_atomic

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
RECORD_FILE = ".s3-objects.json"
PARTIAL_SUFFIX = ".s3-partial"
CHUNK_SIZE = 1 << 20

# Backoff between attempts of one object download: a random delay in [0, min(max, base * 2**(attempt - 1))] s.
# botocore 1.44's standard retry mode uses the same form, with a base of 1 s for throttling and 50 ms otherwise.
RETRY_BASE_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 20.0

# The record is rewritten at most this often while downloading, and at the end when it changed. If
# the process is killed, the objects downloaded since the last write are downloaded again next time.
RECORD_WRITE_INTERVAL_S = 2.0

# The pattern accepts legacy bucket names with upper case and underscores. It requires a letter or
# digit first, which excludes '.' and '..', because the bucket name becomes a folder of the staging cache.
BUCKET_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")

# Error codes that S3 and S3-compatible servers return for throttling and passing overload.
TRANSIENT_ERROR_CODES = frozenset({
    "BandwidthLimitExceeded", "InternalError", "RequestLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException",
})
ACCESS_DENIED_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "ExpiredToken", "InvalidAccessKeyId", "InvalidToken", "SignatureDoesNotMatch",
})
WRONG_REGION_CODES = frozenset({"AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect"})


class S3Error(RuntimeError):
    """Raised when the objects under an S3 prefix cannot be staged; the message names the bucket or key and the fix.

    `transient` is True when the last failure was one that may pass (connection error,
    timeout, HTTP 5xx, throttling), so a later attempt of the whole ingestion can succeed;
    False for a missing bucket, denied access, an unsafe key and the like.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/prefix` into (bucket, prefix), where the prefix is '' or ends with '/'.

    `s3://bucket/raw` and `s3://bucket/raw/` both mean the folder `raw/`, so keys under `raw2/`
    are never included. Raises ValueError for a URI without the s3:// scheme, an invalid bucket
    name, or a prefix that is not a plain relative folder, because the prefix also names a
    folder of the local staging cache.
    """
    if not isinstance(uri, str) or not uri.startswith(S3_SCHEME):
        raise ValueError(f"'{uri}' is not an S3 URI; write it as s3://bucket/prefix")
    bucket, _, prefix = uri[len(S3_SCHEME):].partition("/")
    if not BUCKET_NAME_PATTERN.fullmatch(bucket):
        raise ValueError(
            f"'{uri}': invalid bucket name '{bucket}'; a bucket name has 3 to 255 letters, digits, dots, "
            "hyphens or underscores and starts with a letter or digit"
        )
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    if not prefix:
        return bucket, ""
    problem = _path_problem(prefix)
    if problem is not None:
        raise ValueError(f"'{uri}': the prefix '{prefix}' {problem}; name a folder such as s3://{bucket}/raw/")
    return bucket, prefix + "/"


def download_prefix(
    uri: str,
    staging_dir: Path,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_attempts: int = 5,
) -> dict[str, dict[str, Any]]:
    """Download every object under the S3 prefix `uri` into `staging_dir`, resuming an earlier run.

    Returns {path relative to staging_dir: {"etag": ETag without quotes, "size": bytes}} for
    every object under the prefix, sorted by path; the path is the key without the prefix.
    Keys ending in '/' are folder markers and are skipped. Files that the record lists for
    objects no longer under the prefix are deleted; other files in staging_dir are left alone.

    The client reads credentials, region and endpoint from the standard AWS settings
    (environment variables such as AWS_ENDPOINT_URL, ~/.aws/config); `endpoint_url` and
    `region` override them. A transient failure (connection error, timeout, HTTP 5xx,
    throttling) is retried by botocore for up to `max_attempts` requests, and each object
    download as a whole, including reading the body, for up to `max_attempts` attempts with
    exponential backoff. Raises S3Error naming the bucket or key for any other failure, and,
    before anything is downloaded, for a key that is not a safe relative path under the prefix.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    bucket, prefix = parse_s3_uri(uri)
    staging = Path(staging_dir)
    client = _make_client(endpoint_url, region, max_attempts)
    endpoint = client.meta.endpoint_url

    try:
        listing = _list_objects(client, bucket, prefix)
    except (BotoCoreError, ClientError) as error:
        raise S3Error(_describe_failure(error, bucket, prefix, endpoint, max_attempts),
                      transient=_is_transient(error)) from error
    if not listing:
        raise S3Error(f"no objects found under s3://{bucket}/{prefix} at {endpoint}; check the prefix in the URI")
    planned = _plan_downloads(listing, bucket, prefix, staging)

    staging.mkdir(parents=True, exist_ok=True)
    record = _read_record(staging)
    if _remove_stale_files(staging, record, planned, f"s3://{bucket}/{prefix}"):
        _write_record(staging, record)

    downloaded = 0
    unwritten = False  # whether `record` contains downloads that the record file does not list yet
    last_write = time.monotonic()
    try:
        for relative in sorted(planned):
            key, etag, size = planned[relative]
            target = staging / relative
            entry = {"etag": _strip_quotes(etag), "size": size}
            if record.get(relative) == entry and target.is_file() and target.stat().st_size == size:
                continue
            if relative in record:
                # The file is about to be replaced: the record must stop vouching for the old
                # ETag before the file can hold other bytes.
                del record[relative]
                _write_record(staging, record)
            _download_with_retries(client, bucket, key, etag, size, target, max_attempts)
            record[relative] = entry
            unwritten = True
            downloaded += 1
            log.debug("downloaded s3://%s/%s (%d bytes)", bucket, key, size)
            if time.monotonic() - last_write >= RECORD_WRITE_INTERVAL_S:
                _write_record(staging, record)
                unwritten = False
                last_write = time.monotonic()
    finally:
        if unwritten:
            _write_record(staging, record)

    log.info("s3://%s/%s: downloaded %d object(s), %d already in %s",
             bucket, prefix, downloaded, len(planned) - downloaded, staging)
    return {relative: {"etag": _strip_quotes(planned[relative][1]), "size": planned[relative][2]}
            for relative in sorted(planned)}


def _make_client(endpoint_url: str | None, region: str | None, max_attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    # total_max_attempts counts the first request too; the retries key "max_attempts" would count retries only.
    config = Config(retries={"total_max_attempts": max_attempts, "mode": "standard"})
    client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    _log_botocore_retries(client, max_attempts)
    return client


def _log_botocore_retries(client: Any, max_attempts: int) -> None:
    """Log every request that botocore's retry handler sends again, with the S3 URI and the attempt number."""

    def remember_target(params: dict, context: dict, **_: Any) -> None:
        key = params.get("Key", params.get("Prefix", ""))
        context["unet_s3_uri"] = f"s3://{params.get('Bucket', '')}/{key}"

    def remember_failure(response: Any, caught_exception: Exception | None, request_dict: dict, **_: Any) -> None:
        # Returns None, so the retry decision stays with botocore's own handler.
        if caught_exception is not None:
            failure = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None and response[0].status_code >= 400:
            failure = f"HTTP {response[0].status_code} {response[1].get('Error', {}).get('Code', '')}".rstrip()
        else:
            return
        request_dict["context"]["unet_last_failure"] = failure

    def log_retry(request: Any, operation_name: str, **_: Any) -> None:
        attempt = request.context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            log.warning("%s %s failed (%s); retrying, request attempt %d of %d", operation_name,
                        request.context.get("unet_s3_uri", request.url), request.context.get("unet_last_failure", "error"),
                        attempt, max_attempts)

    events = client.meta.events
    events.register("before-parameter-build.s3", remember_target)
    events.register("needs-retry.s3", remember_failure)
    events.register("request-created.s3", log_retry)


def _list_objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects.extend(page.get("Contents", []))
    return objects


def _path_problem(path: str) -> str | None:
    """Return why `path` is not a plain relative POSIX path, or None when it is one."""
    if "\\" in path:
        return "contains a backslash"
    if "\x00" in path:
        return "contains a NUL character"
    if path.startswith("/"):
        return "is an absolute path"
    segments = path.split("/")
    if ".." in segments:
        return "has a '..' segment"
    if "." in segments or "" in segments:
        return "has an empty or '.' segment"
    return None


def _plan_downloads(
    listing: list[dict[str, Any]], bucket: str, prefix: str, staging: Path
) -> dict[str, tuple[str, str, int]]:
    """Map each object's path relative to `staging` to (key, ETag, size); raise S3Error for an unsafe key."""
    planned: dict[str, tuple[str, str, int]] = {}
    root = staging.resolve()
    for item in listing:
        key = item["Key"]
        if key.endswith("/"):
            continue
        relative = key[len(prefix):]
        problem = _path_problem(relative)
        if problem is None and relative == RECORD_FILE:
            problem = "has the name of the staging record"
        if problem is None and not (root / relative).resolve().is_relative_to(root):
            problem = "resolves outside the staging folder"
        if problem is not None:
            raise S3Error(
                f"unsafe S3 key '{key}' in s3://{bucket}/{prefix}: its path {problem}, so it cannot be stored "
                f"under {staging}; rename or delete the object (nothing was downloaded)"
            )
        planned[relative] = (key, item["ETag"], int(item["Size"]))

    folders = {parent.as_posix() for relative in planned for parent in PurePosixPath(relative).parents}
    clashes = sorted(folders & set(planned))
    if clashes:
        raise S3Error(
            f"S3 key '{prefix}{clashes[0]}' in s3://{bucket}/{prefix} is both an object and a folder of other keys; "
            "rename one of them (nothing was downloaded)"
        )
    return planned


def _read_record(staging: Path) -> dict[str, dict[str, Any]]:
    path = staging / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s); downloading every object again", path, error)
        return {}
    if not isinstance(record, dict):
        log.warning("%s is not a JSON object; downloading every object again", path)
        return {}
    return record


def _write_record(staging: Path, record: dict[str, dict[str, Any]]) -> None:
    write_bytes_atomic((json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), staging / RECORD_FILE)


def _remove_stale_files(
    staging: Path, record: dict[str, dict[str, Any]], planned: dict[str, tuple[str, str, int]], source: str
) -> bool:
    """Delete recorded files whose objects are gone from the prefix, and leftover partial downloads.

    Returns whether the record changed. Only files that the record lists are deleted, so other
    files in the staging folder are kept.
    """
    root = staging.resolve()
    stale = sorted(set(record) - set(planned))
    for relative in stale:
        del record[relative]
        path = staging / relative
        if _path_problem(relative) is not None or not path.resolve().is_relative_to(root):
            log.warning("%s lists '%s', which is not a path inside %s; leaving it alone", RECORD_FILE, relative, staging)
            continue
        if path.is_file():
            path.unlink()
            log.info("deleted %s: its object is no longer under %s", path, source)
        # Drop folders that the deletion left empty, so a spec's case globs do not match them.
        for folder in path.parents:
            if folder == staging or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
    # NOTE: two runs staging the same folder at once are not supported; this would delete the other run's partial files.
    for partial in staging.rglob(f".*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)
    return bool(stale)


def _download_with_retries(
    client: Any, bucket: str, key: str, etag: str, size: int, target: Path, max_attempts: int
) -> None:
    endpoint = client.meta.endpoint_url
    for attempt in range(1, max_attempts + 1):
        try:
            _download_object(client, bucket, key, etag, size, target)
            return
        except (BotoCoreError, ClientError) as error:
            if not _is_transient(error) or attempt == max_attempts:
                raise S3Error(_describe_failure(error, bucket, key, endpoint, max_attempts),
                              transient=_is_transient(error)) from error
            delay = random.uniform(0, min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1)))
            log.warning("download of s3://%s/%s failed (%s: %s); retrying in %.1f s, attempt %d of %d",
                        bucket, key, type(error).__name__, error, delay, attempt + 1, max_attempts)
            time.sleep(delay)


def _download_object(client: Any, bucket: str, key: str, etag: str, size: int, target: Path) -> None:
    """Download one object into a temporary file beside `target` and rename it into place.

    IfMatch makes S3 reject the request when the object changed since the listing, so the
    bytes on disk always belong to the ETag that the record stores.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as stream:
            response = client.get_object(Bucket=bucket, Key=key, IfMatch=etag)
            for chunk in response["Body"].iter_chunks(CHUNK_SIZE):
                stream.write(chunk)
        written = os.path.getsize(temporary)
        if written != size:
            raise IncompleteReadError(actual_bytes=written, expected_bytes=size)
        publish_temporary(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _is_transient(error: Exception) -> bool:
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = error.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in TRANSIENT_ERROR_CODES
    if isinstance(error, SSLError):
        return False
    return isinstance(error, (BotocoreConnectionError, HTTPClientError, IncompleteReadError))


def _describe_failure(error: Exception, bucket: str, key: str, endpoint: str, max_attempts: int) -> str:
    """Return one line naming the bucket or key, what failed and what to do."""
    where = f"s3://{bucket}/{key}"
    if isinstance(error, NoCredentialsError):
        return (f"no AWS credentials found for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE with a profile from ~/.aws/credentials")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            return (f"S3 bucket '{bucket}' not found at {endpoint}; check the bucket name in {where}, "
                    "--endpoint-url and --region")
        if code in ACCESS_DENIED_CODES or status == 403:
            return (f"access to {where} denied at {endpoint} ({code or status}); check the AWS credentials "
                    "and that they allow s3:ListBucket and s3:GetObject there")
        if code in ("NoSuchKey", "404") or status == 404:
            return f"{where} not found at {endpoint}; it was probably deleted after the listing, so run the ingestion again"
        if code == "PreconditionFailed" or status == 412:
            return f"{where} changed during the download; run the ingestion again"
        if code in WRONG_REGION_CODES:
            return f"S3 bucket '{bucket}' is in another region than the client's ({code}); pass its region with --region"
        if not _is_transient(error):
            return f"S3 request for {where} failed at {endpoint}: {code or status} {message}".rstrip()
    if isinstance(error, SSLError):
        return f"TLS connection to {endpoint} failed for {where} ({error}); check the endpoint URL and AWS_CA_BUNDLE"
    return (f"S3 request for {where} failed after {max_attempts} attempts ({error}); check --endpoint-url and "
            "the network, then run again (finished downloads are kept)")


def _strip_quotes(etag: str) -> str:
    return etag.strip('"')
