"""A small client for ComfyUI's HTTP API and a headless server launcher (standard library only).

What batch users, the command line and the tests use to drive a real ComfyUI: upload inputs, queue a prompt, wait
for it in /history, fetch outputs through /view. `HeadlessServer` starts ComfyUI's own main.py on a free loopback
port when no server is running.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExecutionFailed(RuntimeError):
    pass


def messages_of(entry: dict, kind: str) -> list[dict]:
    """The execution messages of one kind ("execution_cached", "execution_error", ...) from a /history entry."""
    return [data for name, data in entry["status"]["messages"] if name == kind]


class ComfyClient:
    """The HTTP API as a user's script drives it: upload, queue, wait, fetch."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def post_json(self, path: str, payload) -> dict:
        body = json.dumps(payload).encode()
        try:
            raw = self._request(path, body, {"Content-Type": "application/json"})
        except urllib.error.HTTPError as e:
            raise ExecutionFailed(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from e
        return json.loads(raw) if raw.strip() else {}

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def upload(self, path: Path, name: str | None = None) -> str:
        """Puts a file into the server's input folder (any file type, as the browser's upload does)."""
        boundary = uuid.uuid4().hex
        name = name or Path(path).name
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode() + Path(path).read_bytes() + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        raw = self._request("/upload/image", b"".join(parts),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=120)
        return json.loads(raw)["name"]

    def queue(self, prompt: dict) -> str:
        return self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 3600, expect: str = "success") -> dict:
        """Polls /history until the prompt ends; fails with the server's own error text unless it ended as expected."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.history(prompt_id)  # a prompt enters the history when it has ended, however it ended
            if entry:
                status = entry["status"]["status_str"]
                if status != expect:
                    errors = messages_of(entry, "execution_error") or entry["status"].get("messages")
                    raise ExecutionFailed(f"prompt ended '{status}', expected '{expect}': "
                                          f"{json.dumps(errors, indent=1)[:6000]}")
                return entry
            time.sleep(0.2)
        raise ExecutionFailed(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 3600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def view(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}", timeout=600)


class HeadlessServer:
    """ComfyUI's main.py on a free loopback port, for as long as the `with` block (or until `stop`)."""

    def __init__(self, comfyui_dir: Path, extra_args: list[str] = (), base_directory: Path | None = None,
                 python: str = sys.executable, env: dict | None = None, log_path: Path | None = None):
        self.comfyui_dir = Path(comfyui_dir)
        if not (self.comfyui_dir / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {self.comfyui_dir} (main.py is missing)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                    *(["--base-directory", str(base_directory)] if base_directory else []), *extra_args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        # the server's output always goes to a file: when it fails to start, its last lines say why
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="comfyui-log-")) / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "HeadlessServer":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "HeadlessServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
