"""miras storage backend `gdrive://<folder-id>/path` (see backend.py)."""

from .backend import DriveBackend, open_backend

__all__ = ["DriveBackend", "open_backend"]
