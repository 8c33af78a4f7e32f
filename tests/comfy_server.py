"""A real ComfyUI server for the tests, and the websocket listener they use on top of the pack's own client.

The server is ComfyUI itself (COMFYUI_DIR, or the 0.3.75 tree tests/install.sh extracted), started with `--cpu` on a
free loopback port with a temporary `--base-directory` whose custom_nodes/ holds a link to this pack, so it loads
the pack exactly the way a user's install does. A network guard (tests/netguard/sitecustomize.py) makes every
connection to a non-loopback address fail and records it.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from narrate_model.client import ComfyClient as _Client
from narrate_model.client import ExecutionFailed, HeadlessServer, messages_of  # noqa: F401 (re-exported)

PACK_NAME = "comfyui-narrating-for-you"  # a clone's usual folder name: not a valid identifier, like users' folders
PROGRESS_TEXT = (3).to_bytes(4, "big")  # ComfyUI's binary event type for a node's progress text
NETGUARD = Path(__file__).resolve().parent / "netguard"


class ComfyServer(HeadlessServer):
    def __init__(self, comfyui_dir: Path, pack_dir: Path, base: Path, extra_args: tuple[str, ...] = ()):
        self.base = Path(base)
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            os.symlink(pack_dir, link)
        self.net_log = self.base / "network_attempts.log"
        env = {"NFY_NETGUARD_LOG": str(self.net_log), "HF_HOME": str(self.base / "hf_home"), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))}
        super().__init__(comfyui_dir, ["--cpu", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
                                       *extra_args],
                         base_directory=self.base, env=env, log_path=self.base / "server.log")

    def network_attempts(self) -> list[str]:
        return self.net_log.read_text().splitlines() if self.net_log.exists() else []


class ComfyClient(_Client):
    def listen(self) -> "WebSocketLog":
        return WebSocketLog(self)


class WebSocketLog:
    """Collects the /ws messages (progress, executing, execution_*) of this client while the block runs."""

    def __init__(self, client: ComfyClient):
        self.client = client
        self.messages: list[dict] = []
        self.times: list[float] = []  # when each message arrived (time.time()), for latency measurements
        self.texts: list[tuple[str, str]] = []  # (node id, text) of the progress-text messages nodes send
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
                    self.times.append(time.time())
                    self.messages.append(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY and msg.data[:4] == PROGRESS_TEXT:
                    node_length = int.from_bytes(msg.data[4:8], "big")
                    self.texts.append((msg.data[8:8 + node_length].decode(), msg.data[8 + node_length:].decode()))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind]

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
