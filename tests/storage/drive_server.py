"""A loopback Google Drive v3 server for the gdrive:// tests: real HTTP on 127.0.0.1, real googleapiclient.

It implements what miras_gdrive uses, and answers 400 to anything else so an unsupported call fails a test:
- POST /token                              OAuth2 JWT-bearer grant; the assertion's RS256 signature is checked
                                           against the service-account key generated for this server
- GET  /drive/v3/files?q=...               `'<id>' in parents`, `name = '...'`, `mimeType = / != '...'`,
                                           `trashed = false`, joined by `and`; pageSize/pageToken paging
- POST /drive/v3/files                     create a folder (metadata only)
- POST /upload/drive/v3/files?uploadType=multipart|resumable, PUT <session>   uploads (resumable: 308 + Range,
                                           `bytes */N` status queries, re-sent overlapping chunks)
- GET  /drive/v3/files/<id>?alt=media      content, with Range
- PATCH /drive/v3/files/<id>               rename;  DELETE /drive/v3/files/<id>
Every Drive call must carry a token from /token and supportsAllDrives=true (list: includeItemsFromAllDrives=true),
as a Shared Drive needs. Drive allows several files with one name in a folder; so does this server.

Fault knobs: `drop_chunks` (drop the next N resumable chunk PUTs: read the body, close without answering),
`quota_error` (uploads answer 403 storageQuotaExceeded as Drive does for a service account's own My Drive),
`page_size_cap` (force paging).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

FOLDER = "application/vnd.google-apps.folder"
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
# google-auth signs service-account assertions for Google's token endpoint whatever token_uri says.
TOKEN_AUDIENCES = ["https://oauth2.googleapis.com/token"]
QUOTA_MESSAGE = (
    "Service Accounts do not have storage quota. Leverage shared drives "
    "(https://developers.google.com/workspace/drive/api/guides/about-shareddrives), or use OAuth delegation instead."
)


class DriveError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _split_and(q: str) -> list[str]:
    """Split a q expression on ` and ` outside quotes."""
    parts, current, quoted, escaped = [], [], False, False
    i = 0
    while i < len(q):
        ch = q[i]
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == "'":
            quoted = not quoted
            current.append(ch)
        elif not quoted and q[i : i + 5].lower() == " and ":
            parts.append("".join(current).strip())
            current = []
            i += 5
            continue
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current).strip())
    return parts


_STRING = r"'((?:[^'\\]|\\.)*)'"


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_q(q: str):
    """A predicate over file records for the subset of Drive's query language the backend uses."""
    tests = []
    for clause in _split_and(q):
        if m := re.fullmatch(_STRING + r"\s+in\s+parents", clause):
            parent = _unescape(m.group(1))
            tests.append(lambda f, p=parent: p in f["parents"])
        elif m := re.fullmatch(r"name\s*=\s*" + _STRING, clause):
            name = _unescape(m.group(1))
            tests.append(lambda f, n=name: f["name"] == n)
        elif m := re.fullmatch(r"mimeType\s*(!?=)\s*" + _STRING, clause):
            op, mime = m.group(1), _unescape(m.group(2))
            tests.append(lambda f, o=op, t=mime: (f["mimeType"] == t) == (o == "="))
        elif re.fullmatch(r"trashed\s*=\s*false", clause):
            tests.append(lambda f: not f["trashed"])
        else:
            raise DriveError(400, "invalid", f"Invalid Value (unsupported query clause {clause!r})")
    return lambda f: all(t(f) for t in tests)


class DriveServer:
    def __init__(self):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.public_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        self.client_email = "miras-test@miras-test.iam.gserviceaccount.com"
        self.lock = threading.RLock()
        self.files: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.tokens: set[str] = set()
        self.ids = (f"id{n:06d}{uuid.uuid4().hex[:6]}" for n in itertools.count())
        self.root_id = self._add({"name": "shared-folder", "mimeType": FOLDER, "parents": []}, b"")["id"]
        # knobs and counters
        self.drop_chunks = 0
        self.quota_error = False
        self.page_size_cap = 1000
        self.counts: dict[str, int] = {}
        self.httpd: ThreadingHTTPServer | None = None

    # -- state
    def _add(self, meta: dict, data: bytes) -> dict:
        now = _now()
        record = {
            "id": next(self.ids),
            "name": meta.get("name", "Untitled"),
            "mimeType": meta.get("mimeType", "application/octet-stream"),
            "parents": list(meta["parents"] if "parents" in meta else [self.root_id]),
            "createdTime": now,
            "modifiedTime": now,
            "trashed": False,
            "data": data,
        }
        self.files[record["id"]] = record
        return record

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def children(self, parent_id: str) -> list[dict]:
        with self.lock:
            return [f for f in self.files.values() if parent_id in f["parents"]]

    def find(self, path: str) -> list[dict]:
        """Records at a `/` path under the root folder (several when names repeat)."""
        level = [self.files[self.root_id]]
        for part in path.strip("/").split("/"):
            level = [c for f in level for c in self.children(f["id"]) if c["name"] == part and not c["trashed"]]
        return level

    @staticmethod
    def public(record: dict) -> dict:
        out = {k: v for k, v in record.items() if k != "data"}
        out["size"] = str(len(record["data"]))
        out["kind"] = "drive#file"
        return out

    # -- service account
    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def service_account_json(self) -> str:
        return json.dumps(
            {
                "type": "service_account",
                "project_id": "miras-test",
                "private_key_id": "k1",
                "private_key": self.private_pem,
                "client_email": self.client_email,
                "client_id": "1234567890",
                "token_uri": f"{self.url}/token",
            }
        )

    # -- lifecycle
    def start(self) -> None:
        server = self

        class Handler(_Handler):
            drive = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    drive: DriveServer

    def log_message(self, format, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle/delayed-ACK stalls

    # -- plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes | dict = b"", headers: dict | None = None) -> None:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json; charset=UTF-8", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, error: DriveError) -> None:
        body = {
            "error": {
                "code": error.status,
                "message": error.message,
                "errors": [{"domain": "global", "reason": error.reason, "message": error.message}],
            }
        }
        self._send(error.status, body)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.route = split.path
        try:
            if self.route == "/token" and self.command == "POST":
                return self._token()
            self._check_auth()
            handler = self._route()
            handler()
        except DriveError as error:
            self._body_consumed_or_drain()
            self._error(error)

    def _body_consumed_or_drain(self) -> None:
        if not getattr(self, "_read", False):
            self._read = True
            self._body()

    def do_GET(self):
        self._read = True
        self._dispatch()

    def do_DELETE(self):
        self._read = True
        self._dispatch()

    def do_POST(self):
        self._read = False
        self._dispatch()

    do_PUT = do_PATCH = do_POST

    def _route(self):
        route, method = self.route, self.command
        if route == "/drive/v3/files":
            return {"GET": self._list, "POST": self._create_folder}.get(method, self._unsupported)
        if m := re.fullmatch(r"/drive/v3/files/([^/]+)", route):
            self.file_id = m.group(1)
            return {"GET": self._get, "PATCH": self._update, "DELETE": self._delete}.get(method, self._unsupported)
        if route == "/upload/drive/v3/files":
            upload_type = self.query.get("uploadType")
            if method == "POST" and upload_type == "multipart":
                return self._multipart
            if method == "POST" and upload_type == "resumable":
                return self._resumable_start
            if method == "PUT" and upload_type == "resumable" and "upload_id" in self.query:
                return self._resumable_put
        return self._unsupported

    def _unsupported(self):
        raise DriveError(400, "badRequest", f"loopback Drive server: unsupported call {self.command} {self.path}")

    def _check_auth(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self.drive.tokens:
            raise DriveError(401, "authError", "Request had invalid authentication credentials.")
        session_put = self.route == "/upload/drive/v3/files" and "upload_id" in self.query  # an opaque session URL
        if self.query.get("supportsAllDrives") != "true" and not session_put:
            raise DriveError(404, "notFound", "File not found (a Shared Drive item needs supportsAllDrives=true).")

    def _record(self, file_id: str) -> dict:
        with self.drive.lock:
            record = self.drive.files.get(file_id)
        if record is None or record["trashed"]:
            raise DriveError(404, "notFound", f"File not found: {file_id}.")
        return record

    # -- OAuth2
    def _token(self) -> None:
        from google.auth import jwt

        form = {k: v[-1] for k, v in parse_qs(self._body().decode()).items()}
        self._read = True
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._send(400, {"error": "unsupported_grant_type"})
        try:
            claims = jwt.decode(form.get("assertion", ""), certs=self.drive.public_pem, audience=TOKEN_AUDIENCES)
        except Exception as error:  # a bad signature, wrong audience, expired
            return self._send(400, {"error": "invalid_grant", "error_description": str(error)})
        if claims.get("iss") != self.drive.client_email or DRIVE_SCOPE not in claims.get("scope", "").split():
            return self._send(400, {"error": "invalid_scope"})
        token = "ya29.test-" + uuid.uuid4().hex
        with self.drive.lock:
            self.drive.tokens.add(token)
        self.drive.count("token")
        self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600})

    # -- files
    def _list(self) -> None:
        self.drive.count("list")
        if self.query.get("includeItemsFromAllDrives") != "true":
            raise DriveError(404, "notFound", "Shared Drive items need includeItemsFromAllDrives=true.")
        match = parse_q(self.query.get("q", ""))
        with self.drive.lock:
            found = sorted((f for f in self.drive.files.values() if f["id"] != self.drive.root_id and match(f)),
                           key=lambda f: f["id"])  # fmt: skip
        size = min(int(self.query.get("pageSize", 100)), self.drive.page_size_cap)
        start = int(self.query.get("pageToken") or 0)
        body = {"kind": "drive#fileList", "files": [self.drive.public(f) for f in found[start : start + size]]}
        if start + size < len(found):
            body["nextPageToken"] = str(start + size)
        self._send(200, body)

    def _parent_ok(self, meta: dict) -> None:
        for parent in meta.get("parents") or []:
            record = self._record(parent)
            if record["mimeType"] != FOLDER:
                raise DriveError(400, "invalidParent", f"Parent {parent} is not a folder.")

    def _create_folder(self) -> None:
        meta = json.loads(self._body() or b"{}")
        self._read = True
        self._parent_ok(meta)
        with self.drive.lock:
            record = self.drive._add(meta, b"")
        self.drive.count("create")
        self._send(200, self.drive.public(record))

    def _quota(self) -> None:
        if self.drive.quota_error:
            raise DriveError(403, "storageQuotaExceeded", QUOTA_MESSAGE)

    def _multipart(self) -> None:
        self.drive.count("multipart")
        body = self._body()
        self._read = True
        self._quota()
        boundary = re.search(r'boundary="?([^";]+)"?', self.headers.get("Content-Type", ""))
        if not boundary:
            raise DriveError(400, "badContent", "multipart upload without a boundary")
        delimiter = b"--" + boundary.group(1).encode()
        parts = body.split(delimiter)[1:-1]  # before the first delimiter: preamble; after the last: "--" epilogue
        if len(parts) != 2:
            raise DriveError(400, "badContent", f"multipart upload with {len(parts)} parts, expected 2")
        contents = []
        for part in parts:
            newline = b"\r\n" if part.startswith(b"\r\n") else b"\n"
            part = part[len(newline) :]
            _headers, _, content = part.partition(newline + newline)
            contents.append(content[: -len(newline)] if content.endswith(newline) else content)
        meta = json.loads(contents[0])
        self._parent_ok(meta)
        with self.drive.lock:
            record = self.drive._add(meta, contents[1])
        self._send(200, self.drive.public(record))

    def _resumable_start(self) -> None:
        self.drive.count("resumable_start")
        meta = json.loads(self._body() or b"{}")
        self._read = True
        self._quota()
        self._parent_ok(meta)
        upload_id = uuid.uuid4().hex
        total = self.headers.get("X-Upload-Content-Length")
        with self.drive.lock:
            self.drive.sessions[upload_id] = {"meta": meta, "data": bytearray(), "total": total, "done": None}
        location = f"{self.drive.url}/upload/drive/v3/files?uploadType=resumable&upload_id={upload_id}"
        self._send(200, b"", {"Location": location})

    def _resumable_put(self) -> None:
        session = self.drive.sessions.get(self.query["upload_id"])
        body = self._body()
        self._read = True
        if session is None:
            raise DriveError(404, "notFound", "Upload session not found.")
        content_range = self.headers.get("Content-Range", "")
        if m := re.fullmatch(r"bytes \*/(\d+|\*)", content_range):  # a status query after an error
            self.drive.count("status_query")
            return self._resumable_answer(session)
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
        if not m:
            raise DriveError(400, "badContent", f"bad Content-Range {content_range!r}")
        self.drive.count("chunk")
        with self.drive.lock:
            if self.drive.drop_chunks > 0:
                self.drive.drop_chunks -= 1
                self.drive.count("dropped")
                self.close_connection = True  # the connection drops: no answer at all
                return
        start, end, total = int(m.group(1)), int(m.group(2)), m.group(3)
        have = len(session["data"])
        if start > have:
            raise DriveError(400, "badContent", f"chunk starts at {start}, server has {have} bytes")
        session["data"] += body[have - start : end - start + 1]
        if total != "*":
            session["total"] = total
        if session["total"] not in (None, "*") and len(session["data"]) >= int(session["total"]):
            with self.drive.lock:
                if session["done"] is None:
                    self._parent_ok(session["meta"])
                    session["done"] = self.drive._add(session["meta"], bytes(session["data"]))
        self._resumable_answer(session)

    def _resumable_answer(self, session: dict) -> None:
        if session["done"] is not None:
            return self._send(200, self.drive.public(session["done"]))
        have = len(session["data"])
        self._send(308, b"", {"Range": f"bytes=0-{have - 1}"} if have else {})

    def _get(self) -> None:
        record = self._record(self.file_id)
        if self.query.get("alt") != "media":
            return self._send(200, self.drive.public(record))
        self.drive.count("download")
        data = record["data"]
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not byte_range or not data:
            return self._send(200, data, {"Content-Type": "application/octet-stream"})
        start = int(byte_range.group(1))
        end = min(int(byte_range.group(2) or len(data) - 1), len(data) - 1)
        if start >= len(data):
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        self._send(206, data[start : end + 1], headers)

    def _update(self) -> None:
        self.drive.count("update")
        meta = json.loads(self._body() or b"{}")
        self._read = True
        record = self._record(self.file_id)
        unknown = set(meta) - {"name"}
        if unknown or self.query.get("addParents") or self.query.get("removeParents"):
            raise DriveError(400, "badRequest", f"loopback Drive server: update supports renames only, got {meta}")
        with self.drive.lock:
            record["name"] = meta.get("name", record["name"])
            record["modifiedTime"] = _now()
        self._send(200, self.drive.public(record))

    def _delete(self) -> None:
        self.drive.count("delete")
        record = self._record(self.file_id)
        with self.drive.lock:
            doomed = [record["id"]]
            while doomed:  # a folder takes its contents with it
                file_id = doomed.pop()
                self.drive.files.pop(file_id, None)
                doomed += [f["id"] for f in self.drive.files.values() if file_id in f["parents"]]
        self._send(204, b"")


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def b64_key(server: DriveServer) -> str:
    return base64.b64encode(server.service_account_json().encode()).decode()
