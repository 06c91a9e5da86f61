import os

pytest_plugins = ("tests.servers",)  # the loopback storage servers (gs, s3, rclone, Drive)

# No hub lookups in tests: without these a miss retries for ~46 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The memory's Triton kernels are tested on the CPU through Triton's interpreter, which has to be chosen before
# triton is first imported: importing miras imports torch._dynamo, which imports triton where it is installed,
# and Triton's own @jit library functions (tl.cumsum's combine, ...) are built then.
os.environ.setdefault("TRITON_INTERPRET", "1")
