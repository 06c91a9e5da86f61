import os

pytest_plugins = ("tests.servers",)  # the loopback storage servers (gs, s3, rclone, Drive)

# No hub lookups in tests: without these a miss retries for ~46 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
