"""One conformance suite, run against every backend on its real (loopback) server."""

from __future__ import annotations

import os

import pytest

from miras.storage import MissingKeyError, StorageError, open_backend
from miras.storage.base import TMP_MARKER
from tests.servers import write

NESTED = "run/checkpoints/step_00000012/trainer/it's a file.bin"


def test_put_get_roundtrip(backend, tmp_path):
    data = os.urandom(1000)
    backend.put(write(tmp_path / "a.bin", data), "run/a.bin")
    backend.get("run/a.bin", tmp_path / "back" / "a.bin")
    assert (tmp_path / "back" / "a.bin").read_bytes() == data


def test_list_is_recursive_relative_and_scoped(backend, tmp_path):
    src = write(tmp_path / "x", b"x")
    for key in ("run/config.json", "run/checkpoints/step_00000001/model.bin", NESTED, "other/file"):
        backend.put(src, key)
    assert backend.list("") == sorted(
        ["run/config.json", "run/checkpoints/step_00000001/model.bin", NESTED, "other/file"]
    )
    assert backend.list("run/checkpoints") == sorted(["run/checkpoints/step_00000001/model.bin", NESTED])
    assert backend.list("run/checkpoints/step_00000012/") == [NESTED]
    assert backend.list("ru") == []  # folder semantics, not string prefixes
    assert backend.list("nowhere/at/all") == []
    assert not any(TMP_MARKER in key for key in backend.list(""))


def test_nested_path_with_quote_and_space(backend, tmp_path):
    backend.put(write(tmp_path / "n", b"nested"), NESTED)
    backend.get(NESTED, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"nested"


def test_overwrite_leaves_one_object_with_new_content(backend, tmp_path):
    backend.put(write(tmp_path / "v1", b"version one"), "run/latest")
    backend.put(write(tmp_path / "v2", b"v2"), "run/latest")
    assert backend.list("run") == ["run/latest"]
    backend.get("run/latest", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"v2"


def test_delete(backend, tmp_path):
    src = write(tmp_path / "d", b"d")
    backend.put(src, "run/a")
    backend.put(src, "run/b")
    backend.delete("run/a")
    assert backend.list("run") == ["run/b"]
    backend.delete("run/a")  # deleting what is not there is not an error
    with pytest.raises(MissingKeyError):
        backend.get("run/a", tmp_path / "gone")


def test_file_larger_than_chunk_size(backend, tmp_path):
    data = os.urandom(1_300_000 + 17)  # > 5 chunks of the gdrive tests' 256 KiB
    backend.put(write(tmp_path / "big", data), "run/big.safetensors")
    backend.get("run/big.safetensors", tmp_path / "big.back")
    assert (tmp_path / "big.back").read_bytes() == data


def test_empty_file(backend, tmp_path):
    backend.put(write(tmp_path / "empty", b""), "run/empty")
    backend.get("run/empty", tmp_path / "empty.back")
    assert (tmp_path / "empty.back").read_bytes() == b""


def test_missing_key_is_a_clear_error(backend, tmp_path):
    with pytest.raises(MissingKeyError) as caught:
        backend.get("run/no-such-file.bin", tmp_path / "out")
    message = str(caught.value)
    assert "no-such-file.bin" in message and "\n" not in message
    assert isinstance(caught.value, StorageError) and isinstance(caught.value, FileNotFoundError)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_reopened_backend_sees_the_same_objects(dest, tmp_path):
    url, options = dest
    open_backend(url, options).put(write(tmp_path / "p", b"persist"), "k/v")
    assert open_backend(url, options).list("k") == ["k/v"]
