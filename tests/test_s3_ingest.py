"""Ingestion from S3, against moto's S3 server started on 127.0.0.1 by this module (boto3 is not mocked).

Requests from the code under test go through `FlakyProxy`, a small reverse proxy in front of
moto, which counts the GetObject requests it forwards and can fail or drop them on demand.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
import pytest

from unet import s3
from unet.ingest import ingest
from unet.io import discover_cases, read_dataset
from unet.s3 import RECORD_FILE, S3Error, download_prefix, parse_s3_uri

CASES = ["BraTS2021_00006", "OtherEXampleFromTCIA", "TCGA-DU-7294"]
OBJECT_COUNT = 15  # three cases, five files each
BUCKET = "bucket"
URI = f"s3://{BUCKET}/raw/"
SLOW_DOWN_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
# Response headers that describe one connection, so the proxy does not copy them from moto's reply.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}

_bucket_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def aws_env(aws_settings) -> Iterator[None]:
    """The test AWS settings, with a short backoff between download attempts (botocore's own is left as it is)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3, "RETRY_BASE_DELAY_S", 0.05)
        yield


def _client(endpoint: str):
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


@pytest.fixture(scope="module")
def raw_bucket(aws_env, moto_endpoint: str, cropped_source: Path) -> str:
    """s3://bucket/raw/<case>/<file>: the cropped cases, uploaded directly to moto."""
    client = _client(moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(cropped_source.rglob("*.nii.gz")):
        client.put_object(Bucket=BUCKET, Key=f"raw/{path.relative_to(cropped_source).as_posix()}", Body=path.read_bytes())
    return BUCKET


def _new_bucket(endpoint: str, objects: dict[str, bytes]) -> str:
    name = f"extra-{next(_bucket_numbers)}"
    client = _client(endpoint)
    client.create_bucket(Bucket=name)
    for key, body in objects.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    return name


class FlakyProxy:
    """Reverse proxy on 127.0.0.1 that forwards every request to moto, except those the settings below fail.

    `fail_gets`: answer this many GetObject requests with 503 SlowDown.
    `cut_gets`: answer this many GetObject requests with moto's headers and half the body.
    `drop_after`: once this many GetObject requests were forwarded, close every connection
    without an answer.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream_port = urlsplit(upstream).port
        self.fail_gets = 0
        self.cut_gets = 0
        self.drop_after: int | None = None
        self.forwarded_keys: list[str] = []
        self.rejected = 0
        self.cut = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.fail_gets = 0
            self.cut_gets = 0
            self.drop_after = None
            self.forwarded_keys.clear()
            self.rejected = 0
            self.cut = 0
            self.requests = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class _ProxyHandler(BaseHTTPRequestHandler):
    def _relay(self) -> None:
        proxy: FlakyProxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        # Path-style addressing: /bucket is a listing, /bucket/key an object.
        is_get_object = self.command == "GET" and "/" in path.strip("/")
        with proxy.lock:
            proxy.requests += 1
            drop = proxy.drop_after is not None and len(proxy.forwarded_keys) >= proxy.drop_after
            fail = not drop and is_get_object and proxy.fail_gets > 0
            if fail:
                proxy.fail_gets -= 1
                proxy.rejected += 1
        if drop:
            self.close_connection = True
            return
        if fail:
            self._reply(503, [("Content-Type", "application/xml")], SLOW_DOWN_XML)
            return

        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        cut = False
        if is_get_object and reply.status == 200:
            with proxy.lock:
                cut = proxy.cut_gets > 0
                if cut:
                    proxy.cut_gets -= 1
                    proxy.cut += 1
                else:
                    proxy.forwarded_keys.append(unquote(path.strip("/").split("/", 1)[1]))
        headers = [(name, value) for name, value in reply.getheaders() if name.lower() not in HOP_HEADERS]
        self._reply(reply.status, headers, data, send_bytes=len(data) // 2 if cut else None)

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, send_bytes: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[:send_bytes])
        if send_bytes is not None:
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FlakyProxy]:
    server = FlakyProxy(moto_endpoint)
    yield server
    server.close()


@pytest.fixture(scope="module")
def first_ingest(raw_bucket: str, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    dest = tmp_path_factory.mktemp("s3-ingest") / "data"
    report = ingest(URI, dest, use_dvc=False, endpoint_url=moto_endpoint)
    return dest, report


@pytest.fixture(scope="module")
def folder_ingest(cropped_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("folder-ingest") / "data"
    ingest(cropped_source, dest, use_dvc=False)
    return dest


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _file_times(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# parse_s3_uri


@pytest.mark.parametrize("uri,expected", [
    ("s3://bucket/raw", ("bucket", "raw/")),
    ("s3://bucket/raw/", ("bucket", "raw/")),
    ("s3://bucket/raw/2021/", ("bucket", "raw/2021/")),
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/", ("bucket", "")),
])
def test_parse_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri,message", [
    ("bucket/raw", "is not an S3 URI"),
    ("s3:///raw", "invalid bucket name ''"),
    ("s3://ab/raw", "invalid bucket name 'ab'"),
    ("s3://bucket/raw/../x", "has a '..' segment"),
    ("s3://bucket//raw", "is an absolute path"),
    ("s3://bucket/raw//2021", "has an empty or '.' segment"),
    ("s3://bucket/raw\\x", "contains a backslash"),
])
def test_parse_uri_rejects(uri, message):
    with pytest.raises(ValueError, match=message):
        parse_s3_uri(uri)


# Ingestion from s3://bucket/raw/


def test_ingest_writes_cases(first_ingest):
    dest, report = first_ingest
    assert sorted(report.written) == CASES
    assert report.skipped == {}


def test_ingest_writes_labels(first_ingest):
    dest, _ = first_ingest
    info, cases = discover_cases(dest)
    assert [case.label is not None for case in cases] == [True, True, True]
    assert info.source_conventions == {case_id: "brats2017" for case_id in CASES}


def test_ingest_matches_folder_ingest(first_ingest, folder_ingest):
    dest, _ = first_ingest
    s3_files = {name: digest for name, digest in _tree_digest(dest).items() if "/" in name}
    folder_files = {name: digest for name, digest in _tree_digest(folder_ingest).items() if "/" in name}
    assert s3_files == folder_files


def test_dataset_named_after_prefix(first_ingest):
    dest, _ = first_ingest
    assert read_dataset(dest).name == "raw"


def test_ingest_uses_default_cache(first_ingest):
    dest, _ = first_ingest
    assert (dest.parent / ".ingest-cache" / BUCKET / "raw" / RECORD_FILE).is_file()


def test_provenance_records_uri(first_ingest):
    dest, _ = first_ingest
    provenance = json.loads((dest / "provenance.json").read_text())
    assert provenance["source_uri"] == URI


def test_provenance_records_etags(first_ingest, moto_endpoint):
    dest, _ = first_ingest
    provenance = json.loads((dest / "provenance.json").read_text())
    client = _client(moto_endpoint)
    for case_id in CASES:
        for role, record in provenance["cases"][case_id]["files"].items():
            head = client.head_object(Bucket=BUCKET, Key=f"raw/{record['source']}")
            assert record["etag"] == head["ETag"].strip('"'), f"{case_id} {role}"
            assert record["size"] == head["ContentLength"], f"{case_id} {role}"


def test_second_ingest_downloads_nothing(first_ingest, proxy, caplog):
    dest, _ = first_ingest
    cache = dest.parent / ".ingest-cache" / BUCKET / "raw"
    cache_times = _file_times(cache)
    case_times = {name: time for name, time in _file_times(dest).items() if "/" in name}
    with caplog.at_level(logging.INFO, logger="unet.s3"):
        report = ingest(URI, dest, use_dvc=False, endpoint_url=proxy.url)
    assert proxy.forwarded_keys == []
    assert f"downloaded 0 object(s), {OBJECT_COUNT} already in" in caplog.text
    assert report.written == []
    assert sorted(report.unchanged) == CASES
    assert _file_times(cache) == cache_times
    assert {name: time for name, time in _file_times(dest).items() if "/" in name} == case_times


def test_ingest_is_deterministic(first_ingest, moto_endpoint, tmp_path):
    dest, _ = first_ingest
    again = tmp_path / "data"
    ingest(URI, again, use_dvc=False, endpoint_url=moto_endpoint, cache_dir=tmp_path / "cache")
    assert _tree_digest(again) == _tree_digest(dest)


# Transient errors, interrupted runs and changed objects


def test_503_retried(raw_bucket, proxy, tmp_path, caplog):
    proxy.fail_gets = 2
    with caplog.at_level(logging.WARNING, logger="unet.s3"):
        report = ingest(URI, tmp_path / "data", use_dvc=False, endpoint_url=proxy.url, cache_dir=tmp_path / "cache")
    retries = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    assert sorted(report.written) == CASES
    assert proxy.rejected == 2
    assert len(retries) == 2
    assert "GetObject s3://bucket/raw/BraTS2021_00006/BraTS2021_00006_flair.nii.gz failed" in retries[0]
    assert "HTTP 503 SlowDown" in retries[0]
    assert "request attempt 3 of 5" in retries[1]
    assert len(proxy.forwarded_keys) == OBJECT_COUNT


def test_cut_body_retried(raw_bucket, cropped_source, proxy, tmp_path, caplog):
    proxy.cut_gets = 1
    with caplog.at_level(logging.WARNING, logger="unet.s3"):
        download_prefix(URI, tmp_path / "cache", endpoint_url=proxy.url)
    name = "BraTS2021_00006/BraTS2021_00006_flair.nii.gz"
    retries = [record.getMessage() for record in caplog.records if "retrying" in record.getMessage()]
    assert proxy.cut == 1
    assert len(retries) == 1
    assert f"download of s3://bucket/raw/{name} failed" in retries[0]
    assert "attempt 2 of 5" in retries[0]
    assert (tmp_path / "cache" / name).read_bytes() == (cropped_source / name).read_bytes()
    assert list((tmp_path / "cache").rglob(f"*{s3.PARTIAL_SUFFIX}")) == []


def test_interrupted_download_resumes(raw_bucket, proxy, tmp_path):
    cache = tmp_path / "cache" / BUCKET / "raw"  # where ingest(cache_dir=tmp_path / "cache") stages URI
    proxy.drop_after = 4
    with pytest.raises(S3Error, match="failed after 2 attempts"):
        download_prefix(URI, cache, endpoint_url=proxy.url, max_attempts=2)
    first_keys = list(proxy.forwarded_keys)
    first_times = _file_times(cache)
    record = json.loads((cache / RECORD_FILE).read_text())
    assert len(first_keys) == 4
    assert proxy.requests == 9  # the listing, four objects, then 2 download attempts x 2 requests for the fifth
    assert sorted(f"raw/{path}" for path in record) == sorted(first_keys)
    assert [name for name in first_times if name.endswith(s3.PARTIAL_SUFFIX)] == []
    assert len(first_times) == 5  # four objects and the record

    proxy.reset()
    report = ingest(URI, tmp_path / "data", use_dvc=False, endpoint_url=proxy.url, cache_dir=tmp_path / "cache")
    assert sorted(report.written) == CASES
    assert len(proxy.forwarded_keys) == OBJECT_COUNT - 4
    assert set(proxy.forwarded_keys).isdisjoint(first_keys)
    for key in first_keys:
        name = key.removeprefix("raw/")
        assert (cache / name).stat().st_mtime_ns == first_times[name], key


def test_changed_local_copy_downloaded_again(raw_bucket, proxy, tmp_path):
    cache = tmp_path / "cache"
    download_prefix(URI, cache, endpoint_url=proxy.url)
    damaged = cache / "TCGA-DU-7294" / "TCGA-DU-7294_t2.nii.gz"
    original = damaged.read_bytes()
    damaged.write_bytes(original[:100])
    proxy.reset()
    download_prefix(URI, cache, endpoint_url=proxy.url)
    assert proxy.forwarded_keys == ["raw/TCGA-DU-7294/TCGA-DU-7294_t2.nii.gz"]
    assert damaged.read_bytes() == original


def test_changed_object_downloaded_again(moto_endpoint, aws_env, proxy, tmp_path):
    bucket = _new_bucket(moto_endpoint, {"raw/a.txt": b"first", "raw/b.txt": b"b"})
    uri = f"s3://{bucket}/raw"
    cache = tmp_path / "cache"
    download_prefix(uri, cache, endpoint_url=proxy.url)
    _client(moto_endpoint).put_object(Bucket=bucket, Key="raw/a.txt", Body=b"second")
    proxy.reset()
    objects = download_prefix(uri, cache, endpoint_url=proxy.url)
    assert proxy.forwarded_keys == ["raw/a.txt"]
    assert (cache / "a.txt").read_bytes() == b"second"
    assert objects["a.txt"]["size"] == 6


def test_deleted_object_removed_from_cache(moto_endpoint, aws_env, proxy, tmp_path):
    bucket = _new_bucket(moto_endpoint, {"raw/keep.txt": b"keep", "raw/gone/old.txt": b"old"})
    uri = f"s3://{bucket}/raw/"
    cache = tmp_path / "cache"
    download_prefix(uri, cache, endpoint_url=proxy.url)
    (cache / "unrelated.txt").write_text("not from S3")
    _client(moto_endpoint).delete_object(Bucket=bucket, Key="raw/gone/old.txt")
    objects = download_prefix(uri, cache, endpoint_url=proxy.url)
    assert sorted(objects) == ["keep.txt"]
    assert not (cache / "gone").exists()
    assert (cache / "unrelated.txt").is_file()


# Rejected keys and permanent errors


@pytest.mark.parametrize("key", [
    "raw/../../evil.nii.gz",
    "raw/case/../../../evil.nii.gz",
    "raw/..\\..\\evil.nii.gz",
    "raw//tmp/evil.nii.gz",
    f"raw/{RECORD_FILE}",
])
def test_escaping_key_rejected(moto_endpoint, aws_env, proxy, tmp_path, key):
    bucket = _new_bucket(moto_endpoint, {"raw/a/ok.nii.gz": b"ok", key: b"evil"})
    assert key in [item["Key"] for item in _client(moto_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    cache = tmp_path / "sandbox" / "cache" / "raw"
    with pytest.raises(S3Error, match=re.escape(f"unsafe S3 key '{key}'")):
        download_prefix(f"s3://{bucket}/raw/", cache, endpoint_url=proxy.url)
    assert proxy.forwarded_keys == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_cli_ingests_prefix(raw_bucket, proxy, tmp_path):
    command = [sys.executable, "-m", "unet.cli", "ingest", URI, str(tmp_path / "data"), "--no-dvc",
               "--endpoint-url", proxy.url, "--region", "us-east-1"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ingested 3 case(s)" in result.stdout
    assert len(proxy.forwarded_keys) == OBJECT_COUNT


def test_missing_bucket_fails_at_once(aws_env, proxy, tmp_path):
    command = [sys.executable, "-m", "unet.cli", "ingest", "s3://nope/x", str(tmp_path / "data"), "--no-dvc",
               "--endpoint-url", proxy.url]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: S3 bucket 'nope' not found at {proxy.url}; check the bucket name in s3://nope/x/, --endpoint-url and --region"
    ]
    assert proxy.requests == 1
    assert not (tmp_path / ".ingest-cache").exists()
