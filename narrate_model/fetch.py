"""Download registry files on request: pinned, resumable, verified before they are used.

Why our own HTTP rather than `huggingface_hub.hf_hub_download`: the hub serves every file of every revision at
`{HF_ENDPOINT}/{repo}/resolve/{revision}/{path}`, so one small client covers hub files, mirrors (HF_ENDPOINT) and
plain HTTPS files alike, and lets us (1) write into a `.part` file next to the destination and nowhere else, so the
hub's cache never holds a hidden second copy of a 2 GB checkpoint, (2) resume that `.part` with a Range request,
also after the connection drops mid-file, and (3) check SHA-256 and size before the file is moved into place, so a
verified file is never replaced by a broken one. `hf_hub_download(local_dir=...)` moves the file into place first
and keeps its own partial-download area, which defeats (1) and (3). Offline mode honours HF_HUB_OFFLINE as the hub
client does; proxies come from the environment (HTTPS_PROXY / HTTP_PROXY / NO_PROXY) through urllib.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .progress import ProgressFn, report
from .weights import (EntryLike, WeightFile, local_path, missing_message, record_hash, resolve, sha256_file,
                      verify)

CHUNK = 1 << 20
ATTEMPTS = 5          # per file: one download plus resumes after dropped connections
RETRY_DELAY = 1.0     # seconds, doubled after each failed attempt
TIMEOUT = 60          # seconds without data before a connection counts as dropped
USER_AGENT = "narrate-for-you/weights (+urllib)"


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says what to do instead."""


class ChecksumError(DownloadError):
    def __init__(self, entry: WeightFile, expected: str, actual: str, kept: Optional[Path]):
        keep = f" The file already in place was kept: {kept}." if kept else ""
        super().__init__(f"{entry.key}: the downloaded file does not match its pinned checksum (expected SHA-256 "
                         f"{expected}, got {actual}); it was discarded.{keep} The source or a mirror serves "
                         f"different bytes than {entry.source}; try again, or check HF_ENDPOINT.")
        self.entry, self.expected, self.actual = entry, expected, actual


class MissingWeightsError(DownloadError):
    """Offline, or nothing to download from: lists every missing file and how to place it."""

    def __init__(self, reason: str, messages: list[str]):
        super().__init__(reason + "\n\n" + "\n\n".join(messages))
        self.messages = messages


def is_offline(offline: Optional[bool] = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def source_url(entry: WeightFile) -> str:
    """Where to fetch `entry` now: hub files through HF_ENDPOINT (a mirror, when set)."""
    return entry.public_url(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


def fetch(entry_or_name: EntryLike, models_dir, progress: ProgressFn = None, offline: Optional[bool] = None,
          force: bool = False) -> list[Path]:
    """Make the named files present and verified under `models_dir`; return their paths.

    A bundle name ("xtts-v2") means its required files; a key ("xtts-v2/speakers_xtts.pth") or WeightFile that file.
    Files already present and matching their SHA-256 are not downloaded again (`force` re-downloads; the present
    copy stays until the new one verifies). Progress reports bytes over all files still to download. Offline
    (`offline=True` or HF_HUB_OFFLINE=1) only present files are used, and the error lists every missing one."""
    entries = resolve(entry_or_name)
    offline = is_offline(offline)
    todo, unavailable = [], []
    for entry in entries:
        # Verified, or without a checksum to hold it to (a file the user placed is theirs to vouch for).
        usable = local_path(entry, models_dir).is_file() and verify(entry, models_dir) is not False
        if usable and (offline or not force or entry.sha256 is None):
            continue
        if offline or entry.sha256 is None or not entry.published:
            unavailable.append(entry)
        else:
            todo.append(entry)
    if unavailable:
        why = ("Offline mode (HF_HUB_OFFLINE or offline=True): these files are missing or fail their checksum"
               if offline else "These files cannot be downloaded automatically")
        raise MissingWeightsError(why + ":", [_unavailable_message(e, models_dir) for e in unavailable])
    counter = _Progress(progress, sum(_expected_size(e, models_dir) for e in todo))
    for entry in todo:
        _download(entry, models_dir, counter)
    counter.finish()
    return [local_path(entry, models_dir) for entry in entries]


def _unavailable_message(entry: WeightFile, models_dir) -> str:
    path = local_path(entry, models_dir)
    note = ""
    if path.is_file() and entry.sha256 is not None:
        note = f"\n(The file at {path} does not match its checksum; replace it.)"
    return missing_message(entry, models_dir) + note


def _expected_size(entry: WeightFile, models_dir) -> int:
    part = _part_path(local_path(entry, models_dir))
    done = part.stat().st_size if part.is_file() else 0
    return max((entry.size or 0) - done, 0)


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


class _Progress:
    """Bytes over all files of one fetch; never goes backwards, even when a server ignores a Range request."""

    def __init__(self, progress: ProgressFn, total: int):
        self.progress, self.total, self.done, self.shown = progress, total, 0, -1

    def add(self, n: int) -> None:
        self.done += n
        self.total = max(self.total, self.done)
        if self.done > self.shown:
            self.shown = self.done
            report(self.progress, self.done, self.total)

    def finish(self) -> None:
        if 0 < self.total and self.shown < self.total:
            self.shown = self.done = self.total
            report(self.progress, self.total, self.total)


def _download(entry: WeightFile, models_dir, counter: _Progress) -> Path:
    dest = local_path(entry, models_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    if part.is_file() and entry.size is not None and part.stat().st_size > entry.size:
        part.unlink()  # not a prefix of this file
    resumed = part.is_file() and part.stat().st_size > 0
    _check_space(dest, entry.size, part)
    _receive(entry, models_dir, part, counter)
    try:
        return _install(entry, models_dir, part, dest)
    except ChecksumError:
        if not resumed:
            raise
    # The .part left by an earlier run was not the start of this file (say, of an older revision): once more, whole.
    _receive(entry, models_dir, part, counter)
    return _install(entry, models_dir, part, dest)


def _receive(entry: WeightFile, models_dir, part: Path, counter: _Progress) -> None:
    """Bring `part` to the full file, resuming after dropped connections."""
    url = source_url(entry)
    delay = RETRY_DELAY
    for attempt in range(1, ATTEMPTS + 1):
        try:
            if _transfer(url, entry, part, counter):
                return
            error = "the connection closed before the whole file arrived"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise DownloadError(f"{entry.key}: {url} answered HTTP {exc.code} {exc.reason}. Check the name and "
                                    f"HF_ENDPOINT, or place the file by hand:\n{missing_message(entry, models_dir)}"
                                    ) from exc
            error = str(exc)
        if attempt == ATTEMPTS:
            raise DownloadError(f"{entry.key}: download from {url} failed {ATTEMPTS} times ({error}). What arrived is "
                                f"kept in {part} and the next attempt resumes from it.")
        time.sleep(delay)
        delay *= 2


def _transfer(url: str, entry: WeightFile, part: Path, counter: _Progress) -> bool:
    """One request, resuming `part`; True when the whole file has arrived."""
    have = part.stat().st_size if part.is_file() else 0
    if entry.size is not None and have == entry.size:
        return True
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    token = os.environ.get("HF_TOKEN")
    if token and entry.repo:
        request.add_unredirected_header("Authorization", f"Bearer {token}")  # never forwarded to the CDN
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked beyond the end: the part is complete, or is not this file
            return entry.size is None or have == entry.size or _restart(part)
        raise
    with response:
        if have and response.status != 206:  # server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else entry.size
        if entry.size is not None and expected is not None and expected != entry.size:
            raise DownloadError(f"{entry.key}: {url} serves {expected:,} bytes, the pinned file has "
                                f"{entry.size:,}; refusing it (is HF_ENDPOINT a faithful mirror?)")
        with part.open("ab" if have else "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                counter.add(len(chunk))
    size = part.stat().st_size
    return expected is None or size >= expected


def _restart(part: Path) -> bool:
    part.unlink(missing_ok=True)
    return False


def _check_space(dest: Path, size: Optional[int], part: Path) -> None:
    if size is None:
        return
    need = size - (part.stat().st_size if part.is_file() else 0)
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise DownloadError(f"{dest.name} needs {need / 1e9:.2f} GB more but {dest.parent} has {free / 1e9:.2f} GB "
                            f"free; make room and run the download again.")


def _install(entry: WeightFile, models_dir, part: Path, dest: Path) -> Path:
    """Verify the finished .part, then move it into place; a mismatch never touches `dest`."""
    actual_size = part.stat().st_size
    digest = sha256_file(part)
    expected = entry.sha256
    if digest != expected or (entry.size is not None and actual_size != entry.size):
        part.unlink(missing_ok=True)
        raise ChecksumError(entry, expected, digest, dest if dest.is_file() else None)
    os.replace(part, dest)
    record_hash(models_dir, entry, digest)
    return dest
