import shlex

import pytest

from tests.vast.helpers import REPO, clean_env, run_script


def test_launch_dry_run_builds_the_vastai_line_with_env_from_the_caller(tmp_path):
    env = clean_env(
        tmp_path,
        WANDB_API_KEY="fake-wandb-secret",
        WANDB_PROJECT="miras",
        GDRIVE_SERVICE_ACCOUNT_JSON_B64="ZmFrZS1rZXk=",
        MIRAS_GDRIVE_FOLDER_ID="1FolderId",
        MIRAS_TRAIN_ARGS="--model-size l --run-name l-run1 --sync-to rclone://gdrive/miras/runs",
        RCLONE_CONFIG_OTHER_TYPE="local",
    )
    result = run_script(
        "launch.sh", env, "123456", "--image", "docker.io/you/miras:0.1.0", "--disk", "450", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[:4] == ["vastai", "create", "instance", "123456"]
    option = dict(zip(words[4::2], words[5::2]))
    assert option["--image"] == "docker.io/you/miras:0.1.0" and option["--disk"] == "450"
    assert option["--onstart-cmd"] == "bash /opt/miras/vast/entrypoint.sh"
    assert "--ssh" in words and "--direct" in words
    env_words = shlex.split(words[words.index("--env") + 1])
    assert env_words[0::2] == ["-e"] * (len(env_words) // 2)
    values = dict(pair.split("=", 1) for pair in env_words[1::2])
    assert values["WANDB_PROJECT"] == "miras" and values["MIRAS_GDRIVE_FOLDER_ID"] == "1FolderId"
    assert values["MIRAS_TRAIN_ARGS"] == env["MIRAS_TRAIN_ARGS"]
    assert values["RCLONE_CONFIG_OTHER_TYPE"] == "local"
    assert values["WANDB_API_KEY"] == values["GDRIVE_SERVICE_ACCOUNT_JSON_B64"] == "***"
    assert "fake-wandb-secret" not in result.stdout + result.stderr and "ZmFrZS1rZXk" not in result.stdout


def test_launch_from_a_repository_clones_it_at_first_start(tmp_path):
    result = run_script(
        "launch.sh",
        clean_env(tmp_path),
        "42",
        "--repo",
        "https://github.com/you/miras.git",
        "--ref",
        "main",
        "--disk",
        "100",
        "--bid",
        "0.35",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    onstart = words[words.index("--onstart-cmd") + 1]
    assert "git clone --quiet https://github.com/you/miras.git /workspace/miras" in onstart
    assert onstart.endswith("bash /workspace/miras/vast/entrypoint.sh")
    assert words[words.index("--bid_price") + 1] == "0.35" and "--env" not in words


def test_launch_disk_defaults_to_miras_estimate(tmp_path):
    """Without --disk, launch.sh asks `python3 -m miras.estimate --train-args ... --field disk_gb` (a stand-in
    python3 here; test_estimate checks that command's answer)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/args\necho 321\n')
    fake.chmod(0o755)
    train_args = "--model-size s --run-name r --ckpt-keep-last 2"
    env = clean_env(tmp_path, MIRAS_TRAIN_ARGS=train_args)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = run_script("launch.sh", env, "7", "--image", "you/miras:1", "--dry-run")
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[words.index("--disk") + 1] == "321"
    assert (tmp_path / "args").read_text().splitlines() == [
        "-m",
        "miras.estimate",
        "--train-args",
        train_args,
        "--field",
        "disk_gb",
    ]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("launch.sh", [], "OFFER_ID is missing"),
        ("launch.sh", ["12ab", "--image", "x/y:1", "--disk", "50"], "OFFER_ID '12ab' is not a number"),
        ("launch.sh", ["1", "--disk", "50"], "give --image IMAGE"),
        ("launch.sh", ["1", "--image", "x/y:1", "--disk", "lots"], "--disk 'lots'"),
        ("launch.sh", ["1", "--image", "x/y:1", "--disk", "50", "--bid", "cheap"], "--bid 'cheap'"),
        ("launch.sh", ["1", "--image", "x/y:1", "--disk", "50", "--color"], "unknown option '--color'"),
        ("build_image.sh", [], "IMAGE is missing"),
        ("build_image.sh", ["you/miras"], "TAG is missing"),
        ("build_image.sh", ["You/Miras", "1"], "IMAGE 'You/Miras' is not a valid image name"),
        ("build_image.sh", ["you/miras", "bad tag!"], "TAG 'bad tag!' is not a valid tag"),
        ("build_image.sh", ["you/miras", "1", "--pushh"], "unknown option '--pushh'"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, script, args, message):
    result = run_script(script, clean_env(tmp_path), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_build_image_dry_run(tmp_path):
    result = run_script("build_image.sh", clean_env(tmp_path), "docker.io/you/miras", "0.1.0", "--push", "--dry-run")
    assert result.returncode == 0, result.stderr
    build, push = [shlex.split(line) for line in result.stdout.splitlines()]
    assert build[:2] == ["docker", "build"] and build[build.index("--platform") + 1] == "linux/amd64"
    assert build[-1] == str(REPO)
    assert build[build.index("-t") + 1] == "docker.io/you/miras:0.1.0"
    assert build[build.index("-f") + 1].endswith("vast/Dockerfile")
    assert push == ["docker", "push", "docker.io/you/miras:0.1.0"]
