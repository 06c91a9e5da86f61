"""gdrive:// specifics against the loopback Drive server: resumable uploads, duplicates, quota, credentials."""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest

from miras.storage import StorageError, open_backend
from miras.storage.base import TMP_MARKER
from tests.servers import write

CHUNK = 256 * 1024


@pytest.fixture
def drive_dest(drive, gdrive_url, gdrive_options):
    drive.drop_chunks, drive.quota_error, drive.page_size_cap = 0, False, 1000
    yield f"{gdrive_url}/{uuid.uuid4().hex[:8]}", dict(gdrive_options), drive
    drive.drop_chunks, drive.quota_error, drive.page_size_cap = 0, False, 1000


def server_path(url: str, drive) -> str:
    return url.split("/", 3)[3]  # gdrive://<root>/<path>


def test_dropped_chunk_resumes_the_same_upload(drive_dest, tmp_path):
    url, options, drive = drive_dest
    backend = open_backend(url, options)
    data = os.urandom(5 * CHUNK + 1234)  # 6 chunks
    before = dict(drive.counts)
    drive.drop_chunks = 1
    backend.put(write(tmp_path / "shard", data), "ckpt/model.safetensors")
    delta = {k: drive.counts.get(k, 0) - before.get(k, 0) for k in drive.counts}
    assert delta["dropped"] == 1
    assert delta["resumable_start"] == 1  # one upload session: resumed, not restarted
    assert delta["chunk"] == 6 + 1  # only the dropped chunk went twice
    (record,) = drive.find(server_path(url, drive) + "/ckpt/model.safetensors")
    assert record["data"] == data


def test_connection_down_for_several_tries_queries_the_server_and_resumes(drive_dest, tmp_path):
    url, options, drive = drive_dest
    backend = open_backend(url, options)
    data = os.urandom(3 * CHUNK + 5)
    before = dict(drive.counts)
    drive.drop_chunks = 3  # more than httplib2's own single re-send: the backend's retry loop takes over
    backend.put(write(tmp_path / "shard", data), "big.bin")
    delta = {k: drive.counts.get(k, 0) - before.get(k, 0) for k in drive.counts}
    assert delta["resumable_start"] == 1 and delta["dropped"] == 3
    assert delta.get("status_query", 0) >= 1  # asked "how far did you get?" (Content-Range: bytes */N)
    backend.get("big.bin", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_upload_gives_up_after_retries_with_a_one_line_error(drive_dest, tmp_path):
    url, options, drive = drive_dest
    backend = open_backend(url, {**options, "retries": "1"})
    drive.drop_chunks = 50
    with pytest.raises(StorageError) as caught:
        backend.put(write(tmp_path / "shard", os.urandom(2 * CHUNK + 1)), "never.bin")
    assert "\n" not in str(caught.value)
    drive.drop_chunks = 0
    assert backend.list("") == []


def test_put_replaces_duplicates_so_exactly_one_file_remains(drive_dest, tmp_path):
    url, options, drive = drive_dest
    backend = open_backend(url, options)
    backend.put(write(tmp_path / "a", b"first"), "run/latest")
    (first,) = drive.find(server_path(url, drive) + "/run/latest")
    # Drive allows two files with one name: make a duplicate behind the backend's back.
    with drive.lock:
        drive._add({"name": "latest", "parents": list(first["parents"])}, b"stray duplicate")
    assert len(drive.find(server_path(url, drive) + "/run/latest")) == 2
    backend.get("run/latest", tmp_path / "newest")
    assert (tmp_path / "newest").read_bytes() == b"stray duplicate"  # get takes the newest
    backend.put(write(tmp_path / "b", b"second"), "run/latest")
    (only,) = drive.find(server_path(url, drive) + "/run/latest")
    assert only["data"] == b"second"
    names = [f["name"] for f in drive.children(first["parents"][0])]
    assert names == ["latest"] and not any(TMP_MARKER in n for n in names)


def test_folders_are_created_once_and_reused(drive_dest, tmp_path):
    url, options, drive = drive_dest
    src = write(tmp_path / "x", b"x")
    open_backend(url, options).put(src, "a/b/c/one")
    open_backend(url, options).put(src, "a/b/c/two")  # a new instance must find, not re-create, a/b/c
    assert len(drive.find(server_path(url, drive) + "/a/b/c")) == 1
    assert open_backend(url, options).list("a") == ["a/b/c/one", "a/b/c/two"]


def test_listing_follows_pages(drive_dest, tmp_path):
    url, options, drive = drive_dest
    backend = open_backend(url, options)
    src = write(tmp_path / "x", b"x")
    keys = [f"many/f{i}" for i in range(7)]
    for key in keys:
        backend.put(src, key)
    drive.page_size_cap = 2
    assert backend.list("many") == keys


def test_quota_error_explains_service_accounts(drive_dest, tmp_path):
    url, options, drive = drive_dest
    drive.quota_error = True
    with pytest.raises(StorageError) as caught:
        open_backend(url, options).put(write(tmp_path / "x", b"x"), "q.bin")
    message = str(caught.value)
    assert "no Drive storage quota of its own" in message and "Shared Drive" in message and "\n" not in message


def test_unknown_folder_says_to_share_it(drive, gdrive_options, tmp_path):
    backend = open_backend("gdrive://NoSuchFolder123/runs", gdrive_options)
    with pytest.raises(StorageError) as caught:
        backend.put(write(tmp_path / "x", b"x"), "k")
    assert "NoSuchFolder123" in str(caught.value) and "shared with" in str(caught.value)


def test_credentials_from_base64_env(drive_dest, tmp_path, monkeypatch):
    url, options, drive = drive_dest
    options.pop("credentials_file")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv(
        "GDRIVE_SERVICE_ACCOUNT_JSON_B64", base64.b64encode(drive.service_account_json().encode()).decode()
    )
    backend = open_backend(url, options)
    backend.put(write(tmp_path / "x", b"via b64"), "k")
    assert backend.list("") == ["k"]


def test_credentials_from_google_application_credentials(drive_dest, tmp_path, monkeypatch):
    url, options, drive = drive_dest
    options.pop("credentials_file")
    monkeypatch.delenv("GDRIVE_SERVICE_ACCOUNT_JSON_B64", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(drive.key_file))
    backend = open_backend(url, options)
    backend.put(write(tmp_path / "x", b"via GAC"), "k")
    assert backend.list("") == ["k"]


def test_missing_or_bad_credentials_are_one_line_errors_without_secrets(drive, gdrive_url, gdrive_options, monkeypatch):
    options = {k: v for k, v in gdrive_options.items() if k != "credentials_file"}
    monkeypatch.delenv("GDRIVE_SERVICE_ACCOUNT_JSON_B64", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(StorageError, match="GDRIVE_SERVICE_ACCOUNT_JSON_B64.*GOOGLE_APPLICATION_CREDENTIALS"):
        open_backend(gdrive_url, options)
    monkeypatch.setenv("GDRIVE_SERVICE_ACCOUNT_JSON_B64", "not base64 at all!!")
    with pytest.raises(StorageError, match="not the base64"):
        open_backend(gdrive_url, options)
    not_a_key = json.dumps({"type": "authorized_user", "refresh_token": "1//secret-refresh-token"})
    monkeypatch.setenv("GDRIVE_SERVICE_ACCOUNT_JSON_B64", base64.b64encode(not_a_key.encode()).decode())
    with pytest.raises(StorageError) as caught:
        open_backend(gdrive_url, options)
    assert "service-account" in str(caught.value) and "secret-refresh-token" not in str(caught.value)


def test_a_key_the_server_does_not_know_fails_sign_in(drive, gdrive_url, gdrive_options, tmp_path):
    impostor = json.loads(_with_url(drive).service_account_json())  # same account name, another RSA key
    key_file = tmp_path / "other.json"
    key_file.write_text(json.dumps(impostor))
    backend = open_backend(gdrive_url, {**gdrive_options, "credentials_file": str(key_file)})
    with pytest.raises(StorageError) as caught:
        backend.list("")
    message = str(caught.value)
    assert "signing in" in message and "\n" not in message and "PRIVATE KEY" not in message


def _with_url(drive):
    """A fresh server object (new RSA key) that claims the running server's URL."""
    from tests.storage.drive_server import DriveServer

    other = DriveServer()
    other.httpd = drive.httpd
    return other


def test_bad_urls_and_options(gdrive_options):
    with pytest.raises(StorageError, match="folder-id"):
        open_backend("gdrive:///no-id", gdrive_options)
    with pytest.raises(StorageError, match="chunksize"):
        open_backend("gdrive://abc/x", {**gdrive_options, "chunksize": "1000"})
