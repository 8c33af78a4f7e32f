"""A tiny Chrome DevTools-protocol driver (aiohttp only) for testing the pack's frontend in headless Chromium.

It starts Chromium with a fresh profile, attaches to its page over the DevTools websocket, and offers what the tests
need: navigate, evaluate JavaScript (awaiting promises), wait for a condition, take a screenshot, and the console
messages and uncaught exceptions the page produced. The protocol runs on an event loop in a background thread, so
console events are collected while the test code runs.
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# Debian's chromium package; headless without a sandbox (tests run as root in a container), and nothing that would
# reach the network on its own.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-port=0", "--remote-allow-origins=*"]


def require_chromium(path: str | None = None) -> str:
    """The Chromium the browser tests drive (NFY_CHROMIUM, else Debian's). Missing, it fails the test on a developer's
    machine and in CI alike: a run must never pass with the js/ layer untested (tests/install.sh installs it)."""
    import os

    import pytest

    path = path or os.environ.get("NFY_CHROMIUM", "/usr/bin/chromium")
    if Path(path).exists():
        return path
    message = f"no Chromium at {path}: run tests/install.sh (apt-get install -y chromium) or set NFY_CHROMIUM"
    pytest.fail(message)


class JavaScriptError(AssertionError):
    pass


class Browser:
    def __init__(self, executable: str, window: tuple[int, int] = (1400, 900), start_timeout: float = 60):
        self.profile = Path(tempfile.mkdtemp(prefix="nfy-chromium-"))
        self.console: list[dict] = []  # {"type": "error"|"warning"|"log"|..., "text": str, "url": str}
        self.exceptions: list[dict] = []  # {"text": str, "url": str, "stack": str}
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={window[0]},{window[1]}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self._call(self._connect(start_timeout), start_timeout + 5)
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _call(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _connect(self, timeout: float) -> None:
        import aiohttp

        port_file = self.profile / "DevToolsActivePort"  # Chromium writes its port here (we asked for port 0)
        deadline = time.time() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Chromium did not start (exit code {self.proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        while True:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            if pages or time.time() > deadline:
                break
            await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self._send(f"{domain}.enable")

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future and not future.done():
                    future.set_result(data)
            else:
                self._event(data.get("method"), data.get("params", {}))

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            frame = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append({"type": params["type"], "text": text, "url": frame[0].get("url", "")})
        elif method == "Log.entryAdded":  # the browser's own messages: failed loads, deprecations, ...
            entry = params["entry"]
            self.console.append({"type": entry["level"], "text": entry["text"], "url": entry.get("url", "")})
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exception = details.get("exception") or {}
            frames = (details.get("stackTrace") or {}).get("callFrames", [])
            self.exceptions.append({
                "text": exception.get("description") or details.get("text", ""),
                "url": details.get("url", ""),
                "stack": "\n".join(f"{f.get('functionName')} {f.get('url')}:{f.get('lineNumber')}" for f in frames),
            })

    async def _send(self, method: str, params: dict | None = None) -> dict:
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[self._next_id] = future
        await self._ws.send_json({"id": self._next_id, "method": method, "params": params or {}})
        reply = await future
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    # -- what the tests use ---------------------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self._call(self._send(method, params), timeout)

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression (awaited when it is a promise), as JSON; page errors raise."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise JavaScriptError((details.get("exception") or {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.1):
        """Polls until the expression is truthy and returns its value; fails with the last value after timeout."""
        deadline = time.time() + timeout
        value = None
        while time.time() < deadline:
            try:
                value = self.evaluate(expression)
            except JavaScriptError as error:
                value = error
            if value and not isinstance(value, JavaScriptError):
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {expression!r} (last: {value!r})")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            if getattr(self, "_ws", None) is not None:
                self._call(self._shutdown(), 10)
        except Exception:
            pass  # the process is ended below anyway
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _shutdown(self) -> None:
        await self._ws.send_json({"id": 0, "method": "Browser.close"})  # no reply comes: the browser just goes
        self._reader.cancel()
        await self._ws.close()
        await self._session.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
