"""`gdrive://<folder-id>/path` through the Google Drive API v3, signed in as a service account.

`<folder-id>` is the id of a folder shared with the service account (Editor), or of a Shared Drive the
account is a member of (Content manager); `path` is created below it as needed. A service account has no
Drive storage quota of its own: files it uploads into its own My Drive fail with storageQuotaExceeded, which
this backend reports with that explanation.

Credentials, first found wins: the `credentials_file` option (a JSON key path), `GDRIVE_SERVICE_ACCOUNT_JSON_B64`
(the key, base64), `GOOGLE_APPLICATION_CREDENTIALS` (a key path). Key contents and access tokens are never logged.

Options (`--storage-option gdrive.KEY=VALUE`):
  credentials_file  service-account JSON key path
  subject           a user to impersonate (domain-wide delegation; uploads then use that user's quota)
  endpoint          API root instead of https://www.googleapis.com (also $MIRAS_GDRIVE_ENDPOINT; tests: loopback)
  chunksize         resumable upload chunk in bytes, a multiple of 256 KiB (default 64 MiB); smaller files go
                    up in one multipart request
  drive_id          the Shared Drive's id when the folder lies in one (lists then use corpora=drive)
  retries, retry_delay, timeout   retries per request/chunk, first back-off in seconds, socket timeout

Atomic put: the file is uploaded under `<name>.miras-tmp-<hex>` in the target folder (resumable, in chunks:
a dropped connection resumes from the server's last byte), then renamed; other files of the same name in that
folder are deleted afterwards, so exactly one remains (Drive allows duplicates). In the instant between the
rename and the deletes two files share the name; `get` takes the newest, so readers never see a partial file.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from miras.storage.base import TMP_MARKER, MissingKeyError, StorageError, clean_key, is_tmp_key, join_key

log = logging.getLogger(__name__)

SCOPES = ["https://www.googleapis.com/auth/drive"]
FOLDER = "application/vnd.google-apps.folder"
DEFAULT_CHUNK = 64 << 20
CHUNK_UNIT = 256 << 10
QUOTA_HINT = (
    "a service account has no Drive storage quota of its own: use a folder in a Shared Drive (add the account as "
    "Content manager) or a folder of a user's My Drive shared with the account, and pass that folder's id"
)
_QUOTA_REASONS = {"storageQuotaExceeded", "quotaExceeded", "teamDriveFileLimitExceeded"}
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def parse_url(url: str) -> tuple[str, str]:
    if not url.lower().startswith("gdrive://"):
        raise StorageError(f"not a gdrive URL: {url!r} (expected gdrive://<folder-id>/path)")
    folder_id, _, path = url[len("gdrive://") :].partition("/")
    if not folder_id or not all(c.isalnum() or c in "-_" for c in folder_id):
        raise StorageError(
            f"bad gdrive URL {url!r}: expected gdrive://<folder-id>/path, the id from the folder's Drive link"
        )
    return folder_id, clean_key(path)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def load_credentials(options: dict[str, str]):
    """Service-account credentials: the option, GDRIVE_SERVICE_ACCOUNT_JSON_B64 or GOOGLE_APPLICATION_CREDENTIALS."""
    from google.oauth2 import service_account

    source, info = None, None
    if options.get("credentials_file"):
        source = f"credentials_file={options['credentials_file']}"
        info = _read_key_file(options["credentials_file"], source)
    elif os.environ.get("GDRIVE_SERVICE_ACCOUNT_JSON_B64"):
        source = "GDRIVE_SERVICE_ACCOUNT_JSON_B64"
        try:
            info = json.loads(base64.b64decode(os.environ[source], validate=False))
        except (ValueError, TypeError):
            raise StorageError(f"{source} is not the base64 of a service-account JSON key") from None
    elif os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        source = "GOOGLE_APPLICATION_CREDENTIALS"
        info = _read_key_file(os.environ[source], source)
    else:
        raise StorageError(
            "gdrive:// needs service-account credentials: set GDRIVE_SERVICE_ACCOUNT_JSON_B64 (base64 of the JSON "
            "key) or GOOGLE_APPLICATION_CREDENTIALS (its path), or pass --storage-option gdrive.credentials_file=PATH"
        )
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise StorageError(f'{source}: not a service-account key (its JSON has no "type": "service_account")')
    try:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    except (ValueError, KeyError) as error:  # messages name missing fields, never values
        raise StorageError(f"{source}: unusable service-account key ({error})") from None
    if options.get("subject"):
        credentials = credentials.with_subject(options["subject"])
    return credentials


def _read_key_file(path: str, source: str) -> Any:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise StorageError(f"{source}: no such file") from None
    except (OSError, ValueError) as error:
        raise StorageError(f"{source}: unreadable service-account key ({type(error).__name__})") from None


def _int_option(options: dict[str, str], name: str, default: float, cast=int):
    try:
        return cast(options.get(name, default))
    except ValueError:
        raise StorageError(f"gdrive option {name}={options[name]!r} is not a number") from None


class DriveBackend:
    def __init__(self, url: str, options: dict[str, str] | None = None):
        self.url = url
        self.options = dict(options or {})
        self.root_id, self.base = parse_url(url)
        self.chunksize = _int_option(self.options, "chunksize", DEFAULT_CHUNK)
        if self.chunksize <= 0 or self.chunksize % CHUNK_UNIT:
            raise StorageError(
                f"gdrive option chunksize={self.chunksize} must be a positive multiple of 262144 (256 KiB)"
            )
        self.retries = _int_option(self.options, "retries", 5)
        self.retry_delay = _int_option(self.options, "retry_delay", 1.0, float)
        self.timeout = _int_option(self.options, "timeout", 120.0, float)
        self.endpoint = self.options.get("endpoint") or os.environ.get("MIRAS_GDRIVE_ENDPOINT") or None
        self.drive_id = self.options.get("drive_id")
        self.credentials = load_credentials(self.options)
        self.account = getattr(self.credentials, "service_account_email", "the service account")
        self._service = None
        self._folders: dict[str, str] = {}
        self._lock = threading.RLock()  # httplib2 is not thread-safe

    # -- client
    @property
    def service(self):
        if self._service is None:
            import google_auth_httplib2
            import httplib2
            from googleapiclient.discovery import build, build_from_document
            from googleapiclient.discovery_cache import get_static_doc

            raw = httplib2.Http(timeout=self.timeout)
            raw.redirect_codes = raw.redirect_codes - {308}  # 308 = "resume incomplete" to resumable uploads
            http = google_auth_httplib2.AuthorizedHttp(self.credentials, http=raw)
            if not self.endpoint:
                self._service = build("drive", "v3", http=http, cache_discovery=False, static_discovery=True)
            else:
                # The bundled discovery document with its root moved. (client_options' api_endpoint would keep
                # uploads on https://, swapping only the host, so it can't point at a plain-http server.)
                document = json.loads(get_static_doc("drive", "v3"))
                root = self.endpoint.rstrip("/") + "/"
                document["rootUrl"] = root
                document["baseUrl"] = root + document["servicePath"]
                self._service = build_from_document(document, http=http)
        return self._service

    def _error(self, error: Exception, what: str) -> StorageError:
        from googleapiclient.errors import HttpError

        if isinstance(error, StorageError):
            return error
        if isinstance(error, HttpError):
            status = error.resp.status
            reasons, message = set(), ""
            try:
                payload = json.loads(error.content or b"{}").get("error", {})
                message = payload.get("message", "")
                reasons = {e.get("reason") for e in payload.get("errors", [])}
            except (ValueError, AttributeError):
                pass
            if reasons & _QUOTA_REASONS or "storage quota" in message.lower():
                return StorageError(f"{self.url}: {what}: Drive storage quota error ({message.strip()}); {QUOTA_HINT}")
            if status == 404:
                return StorageError(
                    f"{self.url}: {what}: not found (HTTP 404); is folder {self.root_id} shared with {self.account}?"
                )
            if status in (401, 403):
                return StorageError(f"{self.url}: {what}: permission denied (HTTP {status}: {message.strip()})")
            return StorageError(f"{self.url}: {what}: HTTP {status}: {message.strip() or error.reason}")
        if type(error).__name__ == "RefreshError":
            return StorageError(f"{self.url}: signing in as {self.account} failed: {str(error).splitlines()[0]}")
        return StorageError(f"{self.url}: {what}: {type(error).__name__}: {error}")

    def _call(self, request, what: str) -> Any:
        try:
            return request.execute(num_retries=self.retries)
        except Exception as error:
            raise self._error(error, what) from None

    # -- names
    def _list_query(self, q: str, fields: str = "nextPageToken, files(id, name, mimeType, createdTime)") -> list[dict]:
        files, token = [], None
        extra = {"corpora": "drive", "driveId": self.drive_id} if self.drive_id else {}
        while True:
            request = self.service.files().list(
                q=q,
                fields=fields,
                pageSize=1000,
                pageToken=token,
                supportsAllDrives=True,
                includeItemsFromAllDrives=True,
                **extra,
            )
            page = self._call(request, "list")
            files += page.get("files", [])
            token = page.get("nextPageToken")
            if not token:
                return files

    def _children(self, parent_id: str, name: str | None = None, folders: bool | None = None) -> list[dict]:
        clauses = [f"'{_escape(parent_id)}' in parents"]
        if name is not None:
            clauses.append(f"name = '{_escape(name)}'")
        if folders is not None:
            clauses.append(f"mimeType {'=' if folders else '!='} '{FOLDER}'")
        clauses.append("trashed = false")
        found = self._list_query(" and ".join(clauses))
        return sorted(found, key=lambda f: (f.get("createdTime", ""), f["id"]))  # oldest first

    def _folder(self, path: str, create: bool) -> str | None:
        """The id of folder `path` (relative to the URL's folder), created when missing if `create`."""
        path = clean_key(path)
        if path in self._folders:
            return self._folders[path]
        if not path:
            return self.root_id
        parent_path, _, name = path.rpartition("/")
        parent = self._folder(parent_path, create)
        if parent is None:
            return None
        existing = self._children(parent, name, folders=True)
        if existing:
            folder_id = existing[0]["id"]  # the oldest, should two have been made concurrently
        elif create:
            body = {"name": name, "mimeType": FOLDER, "parents": [parent]}
            request = self.service.files().create(body=body, fields="id", supportsAllDrives=True)
            folder_id = self._call(request, f"create folder {path!r}")["id"]
        else:
            return None
        self._folders[path] = folder_id
        return folder_id

    def _split(self, key: str) -> tuple[str, str]:
        full = join_key(self.base, clean_key(key))
        if not clean_key(key):
            raise StorageError(f"{self.url}: empty key")
        parent, _, name = full.rpartition("/")
        return parent, name

    # -- uploads
    def _upload(self, local: Path, parent_id: str, name: str) -> str:
        from googleapiclient.http import MediaFileUpload

        size = local.stat().st_size
        body = {"name": name, "parents": [parent_id]}
        if size <= self.chunksize:
            media = MediaFileUpload(str(local), mimetype="application/octet-stream", resumable=False)
            request = self.service.files().create(body=body, media_body=media, fields="id", supportsAllDrives=True)
            return self._call(request, f"upload {name!r}")["id"]
        media = _ChunkUpload(str(local), mimetype="application/octet-stream", chunksize=self.chunksize, resumable=True)
        request = self.service.files().create(body=body, media_body=media, fields="id", supportsAllDrives=True)
        response, failures = None, 0
        while response is None:
            try:
                _progress, response = request.next_chunk(num_retries=self.retries)
                failures = 0
            except Exception as error:
                if not _transient(error) or failures >= self.retries:
                    raise self._error(error, f"upload {name!r}") from None
                failures += 1
                delay = min(self.retry_delay * 2 ** (failures - 1), 60.0)
                log.warning(
                    "gdrive upload of %s interrupted (%s); resuming in %.1f s", name, type(error).__name__, delay
                )
                time.sleep(delay)  # next_chunk then asks the server how far it got and resumes from there
        return response["id"]

    # -- protocol
    def put(self, local: Path, key: str) -> None:
        parent_path, name = self._split(key)
        with self._lock:
            try:
                parent = self._folder(parent_path, create=True)
            except StorageError:
                self._folders.clear()  # a cached folder may have been deleted by someone else: look again
                parent = self._folder(parent_path, create=True)
            tmp_name = f"{name}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
            new_id = self._upload(Path(local), parent, tmp_name)
            try:
                rename = self.service.files().update(
                    fileId=new_id, body={"name": name}, fields="id", supportsAllDrives=True
                )
                self._call(rename, f"rename to {name!r}")
            except StorageError:
                self._delete_ids([new_id], quiet=True)
                raise
            old = [f["id"] for f in self._children(parent, name, folders=False) if f["id"] != new_id]
            self._delete_ids(old)

    def _delete_ids(self, ids: list[str], quiet: bool = False) -> None:
        for file_id in ids:
            try:
                self._call(self.service.files().delete(fileId=file_id, supportsAllDrives=True), "delete")
            except StorageError as error:
                if "HTTP 404" in str(error) or quiet:
                    continue
                raise

    def _lookup(self, key: str) -> list[dict]:
        parent_path, name = self._split(key)
        parent = self._folder(parent_path, create=False)
        return [] if parent is None else self._children(parent, name, folders=False)

    def get(self, key: str, local: Path) -> None:
        from googleapiclient.http import MediaIoBaseDownload

        local = Path(local)
        with self._lock:
            found = self._lookup(key)
            if not found:
                raise MissingKeyError(f"{self.url}: no object {clean_key(key)!r}")
            newest = found[-1]
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as handle:
                    request = self.service.files().get_media(fileId=newest["id"], supportsAllDrives=True)
                    download = MediaIoBaseDownload(handle, request, chunksize=self.chunksize)
                    done, failures = False, 0
                    while not done:
                        try:
                            _status, done = download.next_chunk(num_retries=self.retries)
                        except Exception as error:
                            if not _transient(error) or failures >= self.retries:
                                raise self._error(error, f"download {clean_key(key)!r}") from None
                            failures += 1
                            time.sleep(min(self.retry_delay * 2 ** (failures - 1), 60.0))
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_key(prefix)
        with self._lock:
            folder = self._folder(join_key(self.base, prefix), create=False)
            if folder is None:
                return []
            keys, pending = set(), [(folder, prefix)]
            while pending:
                folder_id, path = pending.pop()
                for child in self._children(folder_id):
                    key = join_key(path, child["name"])
                    if child["mimeType"] == FOLDER:
                        pending.append((child["id"], key))
                    elif not is_tmp_key(key):
                        keys.add(key)
            return sorted(keys)

    def delete(self, key: str) -> None:
        with self._lock:
            self._delete_ids([f["id"] for f in self._lookup(key)])

    def __repr__(self) -> str:
        return f"DriveBackend({self.url!r})"


def _transient(error: Exception) -> bool:
    """A dropped connection, a timeout or a 5xx/429: worth retrying the same chunk."""
    import httplib2
    from googleapiclient.errors import HttpError

    if isinstance(error, HttpError):
        return error.resp.status in _RETRY_STATUS
    return isinstance(error, (OSError, http.client.HTTPException, httplib2.HttpLib2Error, TimeoutError))


def _chunk_upload_class():
    from googleapiclient.http import MediaFileUpload

    class ChunkUpload(MediaFileUpload):
        """Hands out each chunk as bytes rather than a stream slice, so a request re-sent after a dropped
        connection (httplib2 re-sends once by itself) carries the whole chunk again."""

        def has_stream(self):
            return False

    return ChunkUpload


def _ChunkUpload(*args, **kwargs):  # noqa: N802 - built lazily so importing this module needs no googleapiclient
    return _chunk_upload_class()(*args, **kwargs)


def open_backend(url: str, options: dict[str, str] | None = None) -> DriveBackend:
    return DriveBackend(url, options)
