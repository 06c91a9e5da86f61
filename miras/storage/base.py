"""The `StorageBackend` protocol, its errors, and key helpers shared by every backend.

A backend is opened on one destination URL (its *base*, e.g. `s3://bucket/runs`); keys are
`/`-separated paths relative to that base (`my-run/checkpoints/step_00000012/manifest.json`).
Storage moves bytes between local files and keys; it knows nothing of torch or models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, runtime_checkable

# Temporary names used by atomic puts: listing never returns them.
TMP_MARKER = ".miras-tmp-"

# The one list of words that make a name (a storage option, an argument, an environment variable) a secret.
# Names are split into words ("WANDB_API_KEY" -> wandb, api, key; "clientSecret" -> client, secret), so
# "tokens_per_step" or "tokenizer" are not secrets; a name ending in "id" is an identifier ("pad_token_id",
# "AWS_ACCESS_KEY_ID"), not a secret. vast/launch.sh masks environment names with the same words.
SECRET_WORDS = ("secret", "token", "password", "passwd", "pass", "key", "credential", "credentials", "private",
                "auth", "session", "b64", "apikey", "signature")  # fmt: skip
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*:)(?P<password>[^/@\s]+)@")


class StorageError(Exception):
    """A storage failure or a bad storage setting, with a one-line message meant for the user."""


class MissingKeyError(StorageError, FileNotFoundError):
    """`get` of a key that does not exist under the destination."""


@runtime_checkable
class StorageBackend(Protocol):
    """One instance per destination URL; keys are relative to that URL.

    put:    upload a local file under `key`, atomically from a reader's point of view (no half-written
            object ever visible under the final name) and leaving exactly one object under that name.
    get:    download `key` into the local path (created with its parents); MissingKeyError if absent.
    list:   every key under the folder `prefix` (recursive; "" = everything), as full keys relative to
            the base; [] when the folder does not exist. Temporary upload names are never listed.
    delete: remove `key`; a key that does not exist is not an error.
    """

    url: str

    def put(self, local: Path, key: str) -> None: ...

    def get(self, key: str, local: Path) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...


def clean_key(key: str) -> str:
    """Normalise a key: forward slashes, no leading/trailing slash, no empty, `.` or `..` parts."""
    parts = [p for p in str(key).replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError(f"bad storage key {key!r}: '..' is not allowed")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    return clean_key("/".join(p for p in parts if p))


def under_prefix(key: str, prefix: str) -> bool:
    """Folder semantics: `key` lies in folder `prefix` ('' holds everything)."""
    prefix = clean_key(prefix)
    return not prefix or key == prefix or key.startswith(prefix + "/")


def is_tmp_key(key: str) -> bool:
    return TMP_MARKER in key.rsplit("/", 1)[-1]


def one_line(error: BaseException | str, limit: int = 400) -> str:
    """A short single-line description of an error."""
    if isinstance(error, BaseException):
        text = str(error).strip() or type(error).__name__
        if not isinstance(error, StorageError):
            text = f"{type(error).__name__}: {text}"
    else:
        text = error
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_secret_name(name: str) -> bool:
    """Whether a name (option, argument, environment variable) holds a secret, by SECRET_WORDS."""
    words = [word.lower() for word in _WORD.findall(str(name))]
    if not words or words[-1] in ("id", "ids"):
        return False
    return any(word in SECRET_WORDS for word in words)


def redact(text: str, options: dict[str, str] | None = None, extra_secrets: tuple[str, ...] = ()) -> str:
    """`text` with the values of secret options, `extra_secrets` and URL passwords (`scheme://user:password@host`)
    replaced by ***."""
    secrets = [v for k, v in (options or {}).items() if is_secret_name(k) and isinstance(v, str)]
    for value in sorted([*secrets, *extra_secrets], key=len, reverse=True):
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)


def redact_word(word: str) -> str:
    """One argument (of a command line, or a storage option): `secret=VALUE` -> `secret=***`,
    `s3://key:PASSWORD@host` -> `s3://key:***@host`."""
    word = _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", word)
    name, eq, value = word.partition("=")
    if not eq or not value:
        return word
    if is_secret_name(name.lstrip("-")):
        return f"{name}=***"
    return f"{name}={redact_word(value)}" if "=" in value else word  # --storage-option=secret=...
