"""Files past the object stores' multipart (S3) and resumable (GCS) thresholds go up in parts, and a part
whose connection drops half-way is sent again alone: the upload resumes, it does not start over. A loopback
proxy between the client and the emulator records every request and drops one. (Drive's resumable uploads
and a dropped chunk: test_gdrive.py.)"""

from __future__ import annotations

import os
import re
import uuid
from urllib.parse import urlparse

import pytest

from miras.storage import open_backend
from tests.servers import write
from tests.storage.proxy import CuttingProxy

MIB = 2**20
CHUNK = 5 * MIB  # S3's smallest part; a multiple of GCS's 256 KiB
SIZE = 2 * CHUNK + MIB + 17  # three parts


@pytest.fixture
def s3_proxy(s3_endpoint):
    address = urlparse(s3_endpoint)
    proxy = CuttingProxy(address.hostname, address.port)
    yield proxy
    proxy.close()


@pytest.fixture
def gcs_proxy(gcs_url):
    address = urlparse(os.environ["STORAGE_EMULATOR_HOST"])  # set by the emulator's wrapper
    proxy = CuttingProxy(address.hostname, address.port)
    yield proxy
    proxy.close()


def part_numbers(proxy: CuttingProxy, key: str) -> list[int]:
    return [int(re.search(r"partNumber=(\d+)", r.line).group(1)) for r in proxy.lines(rf"{key}\?.*partNumber=")]


def test_s3_uploads_a_large_file_in_parts_and_sends_a_dropped_part_again(s3_proxy, s3_options, tmp_path):
    options = {**s3_options, "endpoint_url": s3_proxy.url, "chunksize": str(CHUNK)}
    backend = open_backend(f"s3://miras-test/{uuid.uuid4().hex[:8]}", options)
    data = os.urandom(SIZE)
    backend.put(write(tmp_path / "shard", data), "whole.safetensors")
    assert s3_proxy.lines(r"^POST \S*whole\.safetensors\?uploads")  # a multipart upload, not one PUT
    assert sorted(part_numbers(s3_proxy, "whole.safetensors")) == [1, 2, 3]

    s3_proxy.cut(r"resumed\.safetensors\?.*partNumber=2", after_bytes=MIB)
    backend.put(write(tmp_path / "shard", data), "resumed.safetensors")
    assert sorted(part_numbers(s3_proxy, "resumed.safetensors")) == [1, 2, 2, 3]  # part 2 twice, no other
    assert [r.cut for r in s3_proxy.lines(r"resumed\.safetensors\?.*partNumber=2")] == [True, False]
    backend.get("resumed.safetensors", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    assert backend.list("") == ["resumed.safetensors", "whole.safetensors"]


def test_gcs_uploads_a_large_file_resumably_and_sends_a_dropped_chunk_again(gcs_proxy, gcs_url, tmp_path):
    options = {"endpoint_url": gcs_proxy.url, "token": "anon", "chunksize": str(CHUNK)}
    backend = open_backend(f"{gcs_url}/{uuid.uuid4().hex[:8]}", options)
    data = os.urandom(SIZE)
    ranges = [f"bytes {start}-{min(start + CHUNK, SIZE) - 1}/{SIZE}" for start in range(0, SIZE, CHUNK)]
    backend.put(write(tmp_path / "shard", data), "whole.safetensors")
    chunks = gcs_proxy.lines(r"whole\.safetensors&upload_id=")
    assert len(gcs_proxy.lines(r"whole\.safetensors&uploadType=resumable")) == 1  # one resumable session
    assert [r.headers["content-range"] for r in chunks] == ranges  # in three chunks

    gcs_proxy.cut(r"resumed\.safetensors&upload_id=", after_bytes=MIB, skip=1)  # the second chunk, 1 MiB in
    backend.put(write(tmp_path / "shard", data), "resumed.safetensors")
    assert len(gcs_proxy.lines(r"resumed\.safetensors&uploadType=resumable")) == 1  # the same session goes on
    chunks = gcs_proxy.lines(r"resumed\.safetensors&upload_id=")
    assert [(r.headers["content-range"], r.cut) for r in chunks] == [
        (ranges[0], False), (ranges[1], True), (ranges[1], False), (ranges[2], False)
    ]  # fmt: skip
    backend.get("resumed.safetensors", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
