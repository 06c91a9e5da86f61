"""Storage: move files between a local folder and a destination URL.

- `StorageBackend` (put/get/list/delete on keys relative to one destination URL), `open_backend(url)`:
  backends come from the entry-point group `miras.storage`, keyed by URL scheme (bare paths are `file`).
- `is_remote`, `check_destination`, `parse_options`: what a URL and its options mean.
- `SECRET_WORDS`, `is_secret_name`, `redact`: the one list of secret names, and removing their values from text.

Storage knows nothing of torch, models, checkpoints or manifests, and imports nothing else of miras:
replication (uploads, remote resume, the remote `latest`) belongs to miras.checkpoint.
"""

from .base import SECRET_WORDS, MissingKeyError, StorageBackend, StorageError, is_secret_name, join_key, redact
from .registry import check_destination, installed_schemes, is_remote, open_backend, parse_options, url_scheme

__all__ = [
    "SECRET_WORDS",
    "MissingKeyError",
    "StorageBackend",
    "StorageError",
    "check_destination",
    "installed_schemes",
    "is_remote",
    "is_secret_name",
    "join_key",
    "open_backend",
    "parse_options",
    "redact",
    "url_scheme",
]
