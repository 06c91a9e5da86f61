"""Start-up benchmark: how long a newcomer waits for `import miras`, `miras --help`, a storage plugin, and
for `miras train` to say it cannot reach the hub.

    python bench/bench_startup.py --out bench/out/startup.json

Each command runs in a fresh interpreter (`--repeats` times, the median reported; the first run of all is
a discarded warm-up that fills the OS file cache), with the wall time from process start to exit. Targets on
an idle 2-core machine: `import miras` < 1 s, `miras --help` < 1.5 s, the offline answer < 5 s. The hub is
made unreachable by pointing HF_ENDPOINT at a closed loopback port (refused at once, like a machine without
network whose resolver fails fast), and a gs:// bucket by an emulator host under .invalid, which never
resolves. Not a test; never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIRAS = str(Path(sys.executable).with_name("miras"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def cases() -> list[dict]:
    offline = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    return [
        {"name": "python -c pass (the interpreter alone)", "argv": [sys.executable, "-c", "pass"], "rc": 0},
        {"name": "import miras", "argv": [sys.executable, "-c", "import miras"], "rc": 0, "target": 1.0},
        {"name": "miras --help", "argv": [MIRAS, "--help"], "rc": 0, "target": 1.5},
        {"name": "miras train --help", "argv": [MIRAS, "train", "--help"], "rc": 0},
        {"name": "import miras_rclone (a storage plugin)", "argv": [sys.executable, "-c", "import miras_rclone"],
         "rc": 0},  # fmt: skip
        {"name": "miras train, default dataset, hub unreachable", "argv": [MIRAS, "train"], "env": offline, "rc": 1,
         "target": 5.0},  # fmt: skip
        {"name": "miras train, default dataset, HF_HUB_OFFLINE=1", "argv": [MIRAS, "train"],
         "env": {"HF_HUB_OFFLINE": "1"}, "rc": 2, "target": 5.0},  # fmt: skip
        {"name": "miras storage ls gs://..., no network", "argv": [MIRAS, "storage", "ls", "gs://bucket/runs"],
         "env": {"STORAGE_EMULATOR_HOST": "http://storage.bench.invalid"}, "rc": 1},  # fmt: skip
    ]


def timed(case: dict, cwd: str) -> float:
    env = {**os.environ, **case.get("env", {})}
    env = {key: value for key, value in env.items() if value != ""}  # "" unsets
    start = time.perf_counter()
    result = subprocess.run(case["argv"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != case["rc"]:
        raise SystemExit(f"{case['name']}: exit {result.returncode}, expected {case['rc']}:\n{result.stderr[-2000:]}")
    if case["rc"] and len(result.stderr.strip().splitlines()) != 1:
        raise SystemExit(f"{case['name']}: expected one line on stderr, got:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run each (smoke run; the numbers mean little)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory(prefix="miras-bench-startup-") as cwd:  # runs/ would land here
        timed(cases()[1], cwd)  # warm-up: the file cache, .pyc files
        for case in cases():
            times = [timed(case, cwd) for _ in range(repeats)]
            rows.append({"command": case["name"], "median_s": round(statistics.median(times), 3),
                         "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                         "target_s": case.get("target")})  # fmt: skip
    load = os.getloadavg()[0]
    print(f"\n{repeats} runs each, median; load average at the end {load:.2f} on {os.cpu_count()} cores\n")
    print("| command | median s | min s | max s | target s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['command']} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} | "
              f"{'' if row['target_s'] is None else '< ' + str(row['target_s'])} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "load_average": load, "cores": os.cpu_count(),
                                        "python": sys.version.split()[0]}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
