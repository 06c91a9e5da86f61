"""Storage: move files between a local run folder and a destination URL.

- `StorageBackend` (put/get/list/delete on keys relative to one destination URL), `open_backend(url)`:
  backends come from the entry-point group `miras.storage`, keyed by URL scheme (bare paths are `file`).
- `Syncer`: background uploads of checkpoints and run files to one or more destinations.
- `find_remote_checkpoints`, `download_checkpoint`, `pull_latest`: resume from a remote run folder.

Storage knows nothing of torch or models; it only reads checkpoint names and manifests.
"""

from .base import MissingKeyError, StorageBackend, StorageError, join_key
from .registry import installed_schemes, open_backend, parse_options, url_scheme
from .remote import download_checkpoint, find_remote_checkpoints, pull_latest, read_remote_latest, run_url
from .sync import DRIVE_DAILY_UPLOAD_CAP, Syncer, drive_cap_warning, estimated_daily_bytes

__all__ = [
    "DRIVE_DAILY_UPLOAD_CAP",
    "MissingKeyError",
    "StorageBackend",
    "StorageError",
    "installed_schemes",
    "join_key",
    "open_backend",
    "parse_options",
    "Syncer",
    "download_checkpoint",
    "drive_cap_warning",
    "estimated_daily_bytes",
    "find_remote_checkpoints",
    "pull_latest",
    "read_remote_latest",
    "run_url",
    "url_scheme",
]
