"""miras storage backend `rclone://REMOTE/path` (see backend.py)."""

from .backend import RcloneBackend, open_backend, rclone_target

__all__ = ["RcloneBackend", "open_backend", "rclone_target"]
