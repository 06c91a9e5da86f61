"""Checkpoints in real training runs: bit-identical resume (1 process, 2-process DDP, FSDP2), kills at
random moments and inside the commit, corruption, SIGTERM, NaN, the run lock, `finished`, and every
checkpoint loading with from_pretrained to the live model's logits."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from miras.checkpoint import verify_folder
from miras.checkpoint.catalog import committed

TINY = ["--model-size", "xs", "--dataset", "builtin", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
TINY += ["--log-every", "1", "--eval-batches", "1", "--no-grad-checkpoint", "--lr", "3e-3", "--warmup-steps", "2"]
ROOT = str(Path(__file__).resolve().parents[1])  # so that `-m tests.hooked_train` imports in every process
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": ROOT}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args, procs=1, hooks=()):
    """`miras train ARGS` on `procs` processes; with `hooks` (tests/hooked_train.py options), the hooked one."""
    module = ["-m", "tests.hooked_train", *hooks, "--"] if hooks else ["-m", "miras.train"]
    if procs == 1:
        return [sys.executable, *module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(free_port()), *module, *args]  # fmt: skip


def run(args, procs=1, env=None, timeout=600, hooks=()):
    extra = {"ACCELERATE_USE_CPU": "1", "MIRAS_EXPECT_WORLD_SIZE": str(procs)} if procs > 1 else {}
    full_env = {**os.environ, **BASE_ENV, **extra, **(env or {})}
    return subprocess.run(command(args, procs, hooks), capture_output=True, text=True, env=full_env, timeout=timeout)


def main_here(args, capsys, lock_free=True):
    """`miras train ARGS` run in this process rather than a new interpreter (~6 s of imports less), for starts
    that end before training: (exit code, stdout, stderr). Accelerate's process-wide state and the ACCELERATE_*
    variables it exports are reset around it. With lock_free, the run's lock must be free afterwards: a start
    that is refused or finds the run finished leaves the run as it found it."""
    from accelerate.state import AcceleratorState

    from miras.checkpoint.lock import RunLock
    from miras.train import main

    saved = dict(os.environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        code = main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        os.environ.clear()
        os.environ.update(saved)
    named = "--output-dir" in args and "--run-name" in args
    run_dir = Path(args[args.index("--output-dir") + 1]) / args[args.index("--run-name") + 1] if named else None
    if lock_free and run_dir is not None and run_dir.exists():
        lock = RunLock(run_dir)
        lock.acquire()  # raises RunLockedError while this process still holds it
        lock.release()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused_here(args, capsys, lock_free=True):
    """A refused start in this process (main_here): (exit code, stderr)."""
    code, _, stderr = main_here(args, capsys, lock_free)
    return code, stderr


def record(folder):
    return ("--record", str(folder))


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def weights(record_dir):
    return torch.load(Path(record_dir) / "weights_rank0.pt")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def straight_and_resumed(tmp_path, procs, steps=6, kill_after_commit=2, extra=(), env=None):
    """N steps straight vs killed after the k-th commit then `--resume auto` to N."""
    common = [*TINY, *extra, "--max-steps", str(steps), "--ckpt-every-steps", "2", "--output-dir", str(tmp_path)]
    straight = run([*common, "--run-name", "straight"], procs, env, hooks=record(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(
        [*common, "--run-name", "resumed", "--resume", "auto"],
        procs,
        {**(env or {}), "MIRAS_TEST_FAULT": f"after_commit:kill@{kill_after_commit}"},
    )
    assert killed.returncode != 0
    assert not (tmp_path / "resumed" / "finished").exists()
    resumed = run([*common, "--run-name", "resumed", "--resume", "auto"], procs, env, hooks=record(tmp_path / "b"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step_{2 * kill_after_commit:08d}" in resumed.stdout
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # every per-step loss, with ==
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert (tmp_path / "resumed" / "finished").exists()
    return straight, resumed


def evaluations(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]


def test_resume_after_sigkill_is_bit_identical_and_checkpoints_load_with_from_pretrained(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("".join(f"held-out document {i}: " + "the quick brown fox. " * 5 + "\n" for i in range(3)))
    straight_and_resumed(tmp_path, procs=1, extra=["--eval-every", "2", "--eval-dataset", str(held_out)])
    # Periodic evaluation on --eval-dataset: at the same steps, to the same values, across the kill and resume.
    assert [step for step, _ in evaluations(tmp_path / "straight")] == [2, 4, 6]
    assert evaluations(tmp_path / "resumed") == evaluations(tmp_path / "straight")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import miras  # noqa: F401  (registers the Auto classes)

    folders = committed(tmp_path / "straight" / "checkpoints")
    assert [f.name for f in folders] == ["step_00000002", "step_00000004", "step_00000006"]
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer("abc")["input_ids"]
        probe = torch.arange(96).remainder(model.config.vocab_size).unsqueeze(0)
        with torch.no_grad():
            logits = model(probe).logits
        live = torch.load(tmp_path / "a" / f"logits_step{int(folder.name[5:])}.pt")
        torch.testing.assert_close(logits, live, rtol=0, atol=1e-6)
    state = json.loads((folders[-1] / "trainer" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1 and state["tokens_seen"] == 6 * 64
    manifest = json.loads((folders[-1] / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__ and "model.safetensors" in manifest["files"]


def test_compiled_training_equals_eager_and_resumes_bit_identically(tmp_path, capsys):
    """--compile on, what `--compile auto` picks for a long CPU run: each block compiled by Inductor, the memory's
    steps compiled inside it. Its losses follow an eager run's to float32 rounding; a new process resuming from
    its step-4 checkpoint compiles again and reproduces the last two steps, the evaluation and the weights bit for
    bit; the periodic evaluation runs eagerly between compiled steps."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("".join(f"held-out document {i}: " + "the quick brown fox. " * 5 + "\n" for i in range(3)))
    common = [*TINY, "--max-steps", "6", "--ckpt-every-steps", "2", "--output-dir", str(tmp_path), "--eval-every",
              "2", "--eval-dataset", str(held_out)]  # fmt: skip
    compiled = run([*common, "--compile", "on", "--run-name", "compiled"], hooks=record(tmp_path / "a"))
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "compile on (--compile on)" in compiled.stdout
    code, _, stderr = main_here([*common, "--compile", "off", "--run-name", "eager"], capsys)  # eager: no process
    assert code == 0, stderr[-3000:]
    for (step, got), (_, want) in zip(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), strict=True):
        assert abs(got - want) <= 1e-4 * abs(want), (step, got, want)

    step4 = str(tmp_path / "compiled" / "checkpoints" / "step_00000004")
    resumed = run([*common, "--compile", "on", "--run-name", "resumed", "--resume", step4],
                  hooks=record(tmp_path / "b"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step_00000004" in resumed.stdout
    assert losses(tmp_path / "resumed") == losses(tmp_path / "compiled")[4:]  # steps 5 and 6, with ==
    assert evaluations(tmp_path / "resumed") == evaluations(tmp_path / "compiled")[2:]
    assert [step for step, _ in evaluations(tmp_path / "compiled")] == [2, 4, 6]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_two_process_ddp_resume_is_bit_identical_and_another_world_size_is_refused(tmp_path, capsys):
    straight_and_resumed(tmp_path, procs=2)
    step4 = str(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    code, stderr = refused_here([*TINY, "--max-steps", "8", "--output-dir", str(tmp_path), "--run-name", "resumed",
                                 "--resume", step4], capsys)  # fmt: skip
    assert code == 2 and "written by 2 processes" in stderr.strip().splitlines()[-1]


def test_fsdp2_shards_parameters_matches_ddp_and_resumes_bit_identically(tmp_path):
    args = [*TINY, "--max-steps", "3", "--output-dir", str(tmp_path)]
    ddp = run([*args, "--run-name", "ddp"], 2, hooks=record(tmp_path / "ddp_rec"))
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    fsdp = run([*args, "--run-name", "fsdp", "--fsdp"], 2, hooks=record(tmp_path / "fsdp_rec"))
    # stdout too: a worker once died of SIGABRT ("terminate called without an active exception") in one of
    # ~10 runs; where in the run it happened is in its log lines.
    assert fsdp.returncode == 0, fsdp.stdout[-2000:] + fsdp.stderr[-3000:]
    for rank in (0, 1):
        recorded = json.loads((tmp_path / "fsdp_rec" / f"rank{rank}.json").read_text())
        assert recorded["world_size"] == 2 and recorded["sharded"] is True  # DTensor shards on each rank
        # Nothing sharded outlives the run into the interpreter's exit, where gloo could abort the process.
        assert json.loads((tmp_path / "fsdp_rec" / f"exit_rank{rank}.json").read_text())["fsdp_modules_alive"] == 0
    ddp_losses, fsdp_losses = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert [s for s, _ in fsdp_losses] == [s for s, _ in ddp_losses]
    for (_, a), (_, b) in zip(ddp_losses, fsdp_losses):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))
    # The FSDP2 checkpoint is an ordinary from_pretrained folder with the sharded optimizer beside it.
    folder = committed(tmp_path / "fsdp" / "checkpoints")[-1]
    assert verify_folder(folder) == []
    assert sorted(p.name for p in (folder / "trainer" / "optimizer").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    from transformers import AutoModelForCausalLM

    import miras  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    probe = torch.arange(96).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, torch.load(tmp_path / "fsdp_rec" / "logits_step3.pt"))
    straight_and_resumed(tmp_path / "resume", procs=2, extra=["--fsdp"])


def kill_tree(pid):
    """SIGKILL torchrun and its workers at once, as a preemption would (torchrun starts each worker in a
    session of its own, so killing torchrun's process group alone would leave them running)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*parent.children(recursive=True), parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def newest_valid(run_dir):
    for folder in reversed(committed(run_dir / "checkpoints")):
        if not verify_folder(folder):
            return folder.name
    return None


def stopped(pid) -> bool:
    """Whether a process of the tree rooted at `pid` stopped itself at a fault point (MIRAS_TEST_FAULT stop)."""
    import psutil

    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return any(process.status() == psutil.STATUS_STOPPED for process in tree)
    except psutil.NoSuchProcess:
        return False


# Where a 2-process run is stopped, then killed whole: inside a save on each rank (`/RANK`), in rank 0's commit
# thread at every step of the commit protocol, and just after the save returned to the loop.
KILL_POINTS = [
    "rank_state_written/0", "rank_state_written/1", "optimizer_save_started/1", "files_written", "before_manifest",
    "before_rename", "before_latest", "after_commit", "step_checkpointed/1",
]  # fmt: skip


def test_killed_at_random_moments_and_inside_commits_on_every_rank_it_always_resumes_from_the_newest_complete_one(
    tmp_path,
):
    """10 SIGKILLs of the whole process tree (torchrun and both workers, as a preemption would): 9 with a rank
    frozen at a point of a save or commit, 1 at a random moment of training, where with a checkpoint every
    step it most likely lands in a commit too. Every start resumes from the newest checkpoint that verifies,
    and the run reads as one (one metrics row per step)."""
    rng = random.Random(7)
    steps = 40  # more than the killed attempts can reach, so every attempt is really killed
    args = [*TINY, "--max-steps", str(steps), "--ckpt-every-steps", "1", "--output-dir", str(tmp_path),
            "--run-name", "chaos", "--resume", "auto"]  # fmt: skip
    run_dir = tmp_path / "chaos"
    faults = [f"{point}:stop@{rng.randint(1, 2)}" for point in KILL_POINTS] + [None]
    rng.shuffle(faults)
    kills = 0
    for attempt, fault in enumerate(faults):
        expected = newest_valid(run_dir)
        env = {**os.environ, **BASE_ENV, "ACCELERATE_USE_CPU": "1", "MIRAS_EXPECT_WORLD_SIZE": "2"}
        if fault:
            env["MIRAS_TEST_FAULT"] = fault
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(command(args, 2), env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            metrics = run_dir / "metrics.jsonl"
            rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                if fault and stopped(process.pid):
                    break  # a rank is frozen exactly at the fault point
                if not fault and metrics.exists() and len(metrics.read_text().splitlines()) > rows:
                    time.sleep(rng.uniform(0.0, 1.5))  # training is under way: a random moment of it
                    break
                time.sleep(0.02)
            if process.poll() is None:
                kill_tree(process.pid)
                kills += 1
            process.wait(timeout=60)
        finally:
            kill_tree(process.pid)
        output = log.read_text()
        assert process.returncode != 0, output[-3000:]
        if expected:  # every attempt gets as far as choosing its checkpoint before it is killed
            assert f"resuming from {expected}" in output, output[-3000:]
    assert kills >= len(faults) - 1
    expected = newest_valid(run_dir)
    final = run(args, 2)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert f"resuming from {expected}" in final.stdout
    assert (run_dir / "finished").exists() and losses(run_dir)[-1][0] == steps
    assert [s for s, _ in losses(run_dir)] == list(range(1, steps + 1))  # one row per step: reads as one run
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_corrupt_checkpoints_are_caught_by_verify_and_skipped_by_resume_auto(tmp_path, capsys):
    common = [*TINY, "--max-steps", "4", "--ckpt-every-steps", "1", "--output-dir", str(tmp_path), "--run-name", "c"]
    first = run([*common, "--resume", "auto"], env={"MIRAS_TEST_FAULT": "after_commit:kill@3"})
    assert first.returncode != 0
    folders = committed(tmp_path / "c" / "checkpoints")
    assert [f.name for f in folders] == ["step_00000001", "step_00000002", "step_00000003"]
    shard = folders[2] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])  # truncated
    data = bytearray((folders[1] / "trainer" / "rank_00000.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (folders[1] / "trainer" / "rank_00000.pt").write_bytes(bytes(data))
    for folder in folders[1:]:
        check = subprocess.run([sys.executable, "-m", "miras.cli", "ckpt", "verify", str(folder)],
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 1 and "INVALID" in check.stderr
    code, stderr = refused_here([*common, "--resume", str(folders[2])], capsys)
    assert code == 2 and "is not a valid checkpoint" in stderr
    resumed = run([*common, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint" in resumed.stdout and "step_00000003" in resumed.stdout
    assert "resuming from step_00000001" in resumed.stdout


def test_sigterm_checkpoints_exits_0_and_the_next_start_continues(tmp_path):
    args = [*TINY, "--max-steps", "400", "--output-dir", str(tmp_path), "--run-name", "t", "--resume", "auto"]
    env = {**os.environ, **BASE_ENV}
    process = subprocess.Popen(command(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-2000:]
    assert "stopped by SIGTERM" in output
    last = committed(tmp_path / "t" / "checkpoints")[-1]
    step = int(last.name[5:])
    assert verify_folder(last) == [] and losses(tmp_path / "t")[-1][0] == step
    assert not (tmp_path / "t" / "finished").exists()
    again = run([*args[:-4], "--max-steps", str(step + 2), "--run-name", "t", "--resume", "auto"])
    assert again.returncode == 0 and f"resuming from {last.name}" in again.stdout


def test_a_nan_stops_without_a_checkpoint_a_second_writer_is_refused_and_finished_is_written(tmp_path, capsys):
    common = [*TINY, "--ckpt-every-steps", "2", "--output-dir", str(tmp_path), "--run-name", "n"]
    nan = run([*common, "--max-steps", "6"], hooks=("--nan-at-step", "3"))
    assert nan.returncode == 3 and "not finite at step 3" in nan.stderr and "step_00000002" in nan.stderr
    assert [f.name for f in committed(tmp_path / "n" / "checkpoints")] == ["step_00000002"]
    assert (tmp_path / "n" / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    code, stderr = refused_here([*common, "--max-steps", "6"], capsys)  # same run name, no --resume: refused
    assert code == 2 and "--resume auto" in stderr

    env = {**os.environ, **BASE_ENV}
    first = subprocess.Popen(command([*common, "--max-steps", "400", "--resume", "auto"]), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        lock = tmp_path / "n" / "lock"
        while time.time() < deadline and f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.2)
        # The lock stays the first writer's, so it is not free afterwards.
        code, stderr = refused_here([*common, "--max-steps", "400", "--resume", "auto"], capsys, lock_free=False)
        assert code == 2 and "in use by pid" in stderr
    finally:
        first.kill()
        first.wait()
    done = run([*common, "--max-steps", "4", "--resume", "auto"])
    assert done.returncode == 0 and (tmp_path / "n" / "finished").exists()
    code, stdout, _ = main_here([*common, "--max-steps", "4", "--resume", "auto"], capsys)
    assert code == 0 and "already finished" in stdout


def test_a_failing_delete_is_logged_and_training_goes_on(tmp_path):
    args = [*TINY, "--max-steps", "3", "--ckpt-every-steps", "1", "--ckpt-keep-last", "1"]
    args += ["--ckpt-keep-milestones", "0", "--output-dir", str(tmp_path), "--run-name", "p"]
    result = run(args, env={"MIRAS_TEST_FAULT": "prune_delete:fail"})  # the first delete fails
    assert result.returncode == 0, result.stderr[-2000:]
    assert "could not delete checkpoint" in result.stdout and (tmp_path / "p" / "finished").exists()
    # retried at the next prune: only the newest is left
    assert [f.name for f in committed(tmp_path / "p" / "checkpoints")] == ["step_00000003"]


def test_resume_refuses_a_changed_model_shape_or_seq_len(tmp_path, capsys):
    common = ["--dataset", "builtin", "--device", "cpu", "--batch-size", "1", "--output-dir", str(tmp_path)]
    first = run([*common, "--seq-len", "32", "--max-steps", "1", "--run-name", "s", "--no-grad-checkpoint"])
    assert first.returncode == 0
    folder = str(committed(tmp_path / "s" / "checkpoints")[-1])
    # Refused after the run's lock is taken: refused_here also checks that it is released.
    code, stderr = refused_here([*common, "--seq-len", "64", "--max-steps", "2", "--run-name", "s2", "--resume",
                                 folder], capsys)  # fmt: skip
    assert code == 2 and "--seq-len 64" in stderr
    code, stderr = refused_here([*common, "--seq-len", "32", "--model-size", "s", "--max-steps", "2", "--run-name",
                                 "s3", "--resume", folder], capsys)  # fmt: skip
    assert code == 2 and "hidden_size" in stderr
    init = run([*common, "--seq-len", "64", "--max-steps", "1", "--run-name", "s4", "--init-from", folder])
    assert init.returncode == 0 and "starting" in init.stdout  # a new run from the weights: any seq-len


def test_the_readme_checkpoint_commands_run_as_written(tmp_path):
    from tests.readme import bash_lines

    lines = bash_lines("Checkpoints and resume")
    assert len(lines) == 3 and lines[0].startswith("python -m miras.train")
    outputs = []
    for line in lines:
        result = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env={**os.environ, **BASE_ENV})  # fmt: skip
        assert result.returncode == 0, line + "\n" + result.stderr[-2000:]
        outputs.append(result.stdout)
    assert "step_00000010" in outputs[1] and "<- latest" in outputs[1]
    assert ": ok (step 10" in outputs[2]
