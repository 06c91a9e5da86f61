"""manifest.json: written last, verified file by file; `miras ckpt verify` and `miras ckpt ls`."""

import json

from miras.checkpoint import build_manifest, verify_folder, write_manifest
from miras.cli import main as miras


def make_checkpoint(folder, step=5, milestone=False, payload=b"weights" * 1000):
    (folder / "trainer").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "trainer" / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(folder, build_manifest(folder, step, milestone))
    return folder


def test_a_complete_folder_verifies(tmp_path):
    folder = make_checkpoint(tmp_path / "step_00000005")
    assert verify_folder(folder) == []
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "trainer/trainer_state.json"}
    assert manifest["step"] == 5 and manifest["milestone"] is False


def test_truncation_a_flipped_byte_a_missing_file_and_no_manifest_are_caught(tmp_path):
    truncated = make_checkpoint(tmp_path / "a")
    with open(truncated / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    assert "size 100" in verify_folder(truncated)[0]

    flipped = make_checkpoint(tmp_path / "b")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[1234] ^= 0x01
    (flipped / "model.safetensors").write_bytes(bytes(data))
    assert "sha256" in verify_folder(flipped)[0]

    missing = make_checkpoint(tmp_path / "c")
    (missing / "trainer" / "trainer_state.json").unlink()
    assert "missing" in verify_folder(missing)[0]

    unfinished = make_checkpoint(tmp_path / "d")
    (unfinished / "manifest.json").unlink()
    assert "no manifest.json" in verify_folder(unfinished)[0]


def test_ckpt_verify_and_ls_commands(tmp_path, capsys):
    run = tmp_path / "run"
    good = make_checkpoint(run / "checkpoints" / "step_00000002", step=2, milestone=True)
    bad = make_checkpoint(run / "checkpoints" / "step_00000004", step=4)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    with open(bad / "model.safetensors", "r+b") as handle:
        handle.seek(10)
        handle.write(b"X")
    assert miras(["ckpt", "verify", str(good)]) == 0
    assert miras(["ckpt", "verify", str(bad)]) == 1
    assert "sha256" in capsys.readouterr().err
    assert miras(["ckpt", "ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_00000002" in out and "milestone" in out and "<- latest" in out
    assert miras(["ckpt", "verify", str(tmp_path / "nope")]) == 2
