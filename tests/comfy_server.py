"""A real ComfyUI server for the tests, and a small client for its HTTP API.

The server is ComfyUI itself (COMFYUI_DIR, or the 0.3.75 tree tests/install.sh extracted), started with `--cpu` on a
free loopback port with a temporary `--base-directory` whose custom_nodes/ holds a link to this pack, so it loads
the pack exactly the way a user's install does. A network guard (tests/netguard/sitecustomize.py) makes every
connection to a non-loopback address fail and records it.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_NAME = "comfyui-narrating-for-you"  # a clone's usual folder name: not a valid identifier, like users' folders
NETGUARD = Path(__file__).resolve().parent / "netguard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_dir: Path, pack_dir: Path, base: Path, python: str = sys.executable):
        self.comfyui_dir, self.base = Path(comfyui_dir), Path(base)
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            os.symlink(pack_dir, link)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.net_log = self.base / "network_attempts.log"
        self.python = python
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1", NFY_NETGUARD_LOG=str(self.net_log),
                   HF_HOME=str(self.base / "hf_home"), HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")])))
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def network_attempts(self) -> list[str]:
        return self.net_log.read_text().splitlines() if self.net_log.exists() else []

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
        if getattr(self, "_log", None):
            self._log.close()


class ExecutionFailed(AssertionError):
    pass


class ComfyClient:
    """The HTTP API as a user's script drives it: upload, queue, wait, fetch."""

    def __init__(self, url: str):
        self.url = url
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
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(raw)["name"]

    def queue(self, prompt: dict) -> str:
        return self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300, expect: str = "success") -> dict:
        """Polls /history until the prompt ends; fails with the server's own error text unless it ended as expected."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.history(prompt_id)  # a prompt enters the history when it has ended, however it ended
            if entry:
                status = entry["status"]["status_str"]
                if status != expect:
                    raise ExecutionFailed(f"prompt ended '{status}', expected '{expect}': "
                                          f"{json.dumps(entry['status'].get('messages'), indent=1)[:6000]}")
                return entry
            time.sleep(0.2)
        raise ExecutionFailed(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def view(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}", timeout=120)

    def listen(self) -> "WebSocketLog":
        return WebSocketLog(self)


def messages_of(entry: dict, kind: str) -> list[dict]:
    """The execution messages of one kind ("execution_cached", "execution_error", ...) from a /history entry."""
    return [data for name, data in entry["status"]["messages"] if name == kind]


class WebSocketLog:
    """Collects the /ws messages (progress, executing, execution_*) of this client while the block runs."""

    def __init__(self, client: ComfyClient):
        self.client = client
        self.messages: list[dict] = []
        self._stop = threading.Event()
        self._ready = threading.Event()

    def __enter__(self) -> "WebSocketLog":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        assert self._ready.wait(15), "could not connect to /ws"
        return self

    async def _run(self) -> None:
        import aiohttp

        ws_url = self.client.url.replace("http", "ws", 1) + f"/ws?clientId={self.client.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind]

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
