"""A loopback HTTP/1.1 proxy in front of a storage emulator: it records every request (its request line and
the body bytes it forwarded) and can drop the connection in the middle of one request's body, as a network
failure during an upload would. Responses are relayed as they come."""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass


@dataclass
class Request:
    line: str
    headers: dict[str, str]  # names in lower case
    sent: int = 0  # body bytes forwarded to the server
    cut: bool = False


class CuttingProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.requests: list[Request] = []
        self._armed: list | None = None  # [pattern, matches to let through first, body bytes before the cut]
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, request_line_pattern: str, after_bytes: int, skip: int = 0) -> None:
        """Drop the connection of the request whose line matches after `skip` others did, once `after_bytes`
        of its body went on (once)."""
        with self._lock:
            self._armed = [re.compile(request_line_pattern), skip, after_bytes]

    def lines(self, pattern: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if re.search(pattern, r.line)]

    def close(self) -> None:
        self._server.close()

    # -- the relay
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._relay, args=(server, client), daemon=True).start()
        reader = client.makefile("rb")
        try:
            while True:
                head = self._read_head(reader)
                if head is None:
                    return
                headers = self._headers(head)
                request = Request(head.split(b"\r\n", 1)[0].decode("latin-1"), headers)
                with self._lock:
                    self.requests.append(request)
                    cut = None
                    if self._armed is not None and self._armed[0].search(request.line):
                        if self._armed[1] == 0:
                            cut, self._armed = self._armed[2], None
                        else:
                            self._armed[1] -= 1
                server.sendall(head)
                for block in self._body(reader, headers):
                    if cut is not None and request.sent + len(block) > cut:
                        server.sendall(block[: cut - request.sent])
                        request.sent, request.cut = cut, True
                        return  # the finally below drops both connections mid-body
                    server.sendall(block)
                    request.sent += len(block)
        except OSError:
            return
        finally:
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    @staticmethod
    def _read_head(reader) -> bytes | None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            if not line:
                return None
            head += line
        return head

    @staticmethod
    def _headers(head: bytes) -> dict[str, str]:
        lines = (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:] if line)
        return {name.strip().lower(): value.strip() for name, _, value in lines}

    @staticmethod
    def _body(reader, headers: dict[str, str]):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = reader.readline()
                size = int(size_line.split(b";")[0], 16)
                data = reader.read(size + 2)
                yield size_line + data
                if size == 0:
                    return
        left = int(headers.get("content-length", "0"))
        while left > 0:
            block = reader.read(min(left, 256 * 1024))
            if not block:
                return
            left -= len(block)
            yield block

    @staticmethod
    def _relay(source: socket.socket, target: socket.socket) -> None:
        try:
            while block := source.recv(256 * 1024):
                target.sendall(block)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
