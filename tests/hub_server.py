"""A small stand-in for the Hugging Face hub on 127.0.0.1, for download tests.

It answers `GET/HEAD /{repo}/resolve/{revision}/{path}` the way the hub does for LFS files: `X-Repo-Commit`, an
`ETag` holding the file's SHA-256, and a 302 redirect to a content URL (`/lfs/{sha256}`), which serves the bytes with
`Content-Length`, `Accept-Ranges` and `Range` (206 / 416). Plain files (`/static/...`) stand for non-hub HTTPS
sources. Knobs for failure tests: `cut_once` (send half a file, then drop the connection, once per path) and
`corrupt` (serve the right length, wrong bytes). Every request is logged in `requests`.
"""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    authorized: bool = False


@dataclass
class HubServer:
    files: dict = field(default_factory=dict)     # (repo, revision, path) -> bytes
    static: dict = field(default_factory=dict)    # "/static/name" -> bytes
    cut_once: set = field(default_factory=set)    # content paths ("/lfs/<sha>" or "/static/...") to cut once
    corrupt: set = field(default_factory=set)     # content paths served with flipped bytes
    requests: list = field(default_factory=list)

    def add(self, repo: str, revision: str, path: str, data: bytes) -> str:
        self.files[(repo, revision, path)] = data
        return "/lfs/" + hashlib.sha256(data).hexdigest()

    def start(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                hub.requests.append(Logged(self.command, self.path, self.headers.get("Range"),
                                           "Authorization" in self.headers))
                match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", self.path)
                if match:
                    data = hub.files.get(match.groups())
                    if data is None:
                        return self._status(404, {"X-Error-Code": "EntryNotFound"})
                    sha = hashlib.sha256(data).hexdigest()
                    return self._status(302, {"Location": f"/lfs/{sha}", "X-Repo-Commit": match.group(2),
                                              "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                                              "X-Linked-Size": str(len(data))})
                data = hub.static.get(self.path)
                if data is None and self.path.startswith("/lfs/"):
                    data = next((d for d in hub.files.values()
                                 if hashlib.sha256(d).hexdigest() == self.path[5:]), None)
                if data is None:
                    return self._status(404, {})
                if self.path in hub.corrupt:
                    data = bytes(b ^ 0xFF for b in data)
                self._content(data, body)

            def _status(self, code: int, headers: dict):
                self.send_response(code)
                for key, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(key, value)
                self.end_headers()

            def _content(self, data: bytes, body: bool):
                start, end, code = 0, len(data) - 1, 200
                wanted = self.headers.get("Range")
                if wanted:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start = int(first)
                    end = min(int(last), end) if last else end
                    if start >= len(data):
                        return self._status(416, {"Content-Range": f"bytes */{len(data)}"})
                    code = 206
                self.send_response(code)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                payload = data[start:end + 1]
                if self.path in hub.cut_once:
                    hub.cut_once.discard(self.path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the client sees a short body
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
