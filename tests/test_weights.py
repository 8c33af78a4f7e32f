"""Weights: registry facts, download on request (progress, resume, verify-before-use, offline), conversion, CLI.

Downloads run against tests/hub_server.py on 127.0.0.1 through HF_ENDPOINT, exactly as a hub mirror is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hub_server import HubServer
from narrate_model import fetch as fetch_mod
from narrate_model import weights
from narrate_model.__main__ import main as cli
from narrate_model.errors import CheckpointError
from narrate_model.fetch import ChecksumError, MissingWeightsError, fetch
from narrate_model.weights import (REGISTRY, WeightFile, convert_to_safetensors, licence_notice, local_path,
                                   missing_message, require, resolve, status, trusted_conversion)

REPO = "nfy-test/tiny-model"
REV = "0123456789abcdef0123456789abcdef01234567"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(fetch_mod, "CHUNK", 16 << 10)
    monkeypatch.setattr(fetch_mod, "RETRY_DELAY", 0.01)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def serve(hub: HubServer, name: str, data: bytes, **changes) -> WeightFile:
    """A registry entry for `data`, served by the test hub at the pinned revision."""
    hub.add(REPO, REV, f"weights/{name}", data)
    fields = dict(key=f"tiny/{name}", bundle="tiny", title=f"tiny {name}", dest=f"narrate/tiny/{name}",
                  licence="MIT", sha256=sha(data), size=len(data), repo=REPO, revision=REV, path=f"weights/{name}")
    return WeightFile(**{**fields, **changes})


def content_gets(hub: HubServer, data: bytes):
    return [r for r in hub.requests if r.method == "GET" and r.path == f"/lfs/{sha(data)}"]


# --- the registry ------------------------------------------------------------------------------------------------

def test_registry_pins_every_published_file_and_places_it_in_the_agreed_folders(tmp_path):
    keys = [e.key for e in REGISTRY]
    assert len(keys) == len(set(keys))
    folders = ("narrate/xtts/XTTS-v2/", "narrate/hallo/", "narrate/motion_module/", "vae/",
               "narrate/wav2vec2/wav2vec2-base-960h/", "narrate/face_analysis/", "narrate/entangle/",
               "narrate/metrics/")
    for entry in REGISTRY:
        assert entry.dest.startswith(folders), entry.key
        assert entry.licence in weights.LICENCES
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry.key
        if entry.repo:
            assert re.fullmatch(r"[0-9a-f]{40}", entry.revision), entry.key
        if entry.sha256:
            assert isinstance(entry.size, int) and entry.size > 0 and (entry.repo or entry.url), entry.key
    assert {e.key for e in resolve("xtts-v2")} == {"xtts-v2/config.json", "xtts-v2/model.pth", "xtts-v2/vocab.json"}
    assert "xtts-v2/speakers_xtts.pth" in {e.key for e in resolve("xtts-v2", include_optional=True)}
    with pytest.raises(KeyError, match="xtts-v2"):
        resolve("no-such-model")


def test_licences_and_missing_messages_say_what_goes_where(tmp_path):
    model = resolve("xtts-v2/model.pth")[0]
    assert "non-commercial" in licence_notice(model) and "Coqui Public Model License" in licence_notice(model)
    assert "non-commercial research" in licence_notice(resolve("face-analysis/glintr100.onnx")[0])
    message = missing_message(model, tmp_path)
    target = local_path(model, tmp_path)
    for part in (target.name, str(target.parent), "python -m narrate_model download xtts-v2 --models-dir",
                 str(tmp_path), model.sha256, "non-commercial"):
        assert part in message
    with pytest.raises(CheckpointError) as raised:
        require(model, tmp_path)
    assert str(raised.value) == message
    unknown = resolve("hallo/net.pth")[0]
    assert unknown.sha256 is None and "checksum is not known" in missing_message(unknown, tmp_path)
    assert "not published" in missing_message(resolve("entangle")[0], tmp_path)


# --- downloads -----------------------------------------------------------------------------------------------------

def test_download_is_pinned_verified_and_reports_monotonic_progress(hub, tmp_path):
    files = {"a.bin": blob(200_000, 1), "b.bin": blob(70_001, 2)}
    entries = [serve(hub, name, data) for name, data in files.items()]
    calls = []
    paths = fetch(entries, tmp_path, progress=lambda done, total: calls.append((done, total)))

    assert [p.read_bytes() for p in paths] == list(files.values())
    total = sum(map(len, files.values()))
    assert calls[-1] == (total, total) and len(calls) > 10
    assert all(t == total for _, t in calls)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    assert not list(tmp_path.rglob("*.part"))
    resolves = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolves == [f"/{REPO}/resolve/{REV}/weights/a.bin", f"/{REPO}/resolve/{REV}/weights/b.bin"]
    assert [row.verified for row in status(tmp_path, entries)] == [True, True]

    seen = len(hub.requests)
    assert fetch(entries, tmp_path) == paths  # present and verified: no network at all
    assert len(hub.requests) == seen


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    data = blob(150_000, 3)
    entry = serve(hub, "cut.bin", data)
    hub.cut_once.add(f"/lfs/{sha(data)}")
    calls = []
    (path,) = fetch(entry, tmp_path, progress=lambda d, t: calls.append(d))

    assert path.read_bytes() == data
    gets = content_gets(hub, data)
    assert len(gets) == 2 and gets[0].range is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", gets[1].range).group(1))
    assert 0 < resumed_at < len(data)
    assert calls == sorted(calls) and calls[-1] == len(data)


def test_hub_token_is_sent_to_the_hub_but_not_along_the_redirect(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    data = blob(5_000, 15)
    fetch(serve(hub, "gated.bin", data), tmp_path)
    assert [(r.path.startswith("/lfs/"), r.authorized) for r in hub.requests] == [(False, True), (True, False)]


def test_part_file_from_an_interrupted_run_is_resumed(hub, tmp_path):
    data = blob(90_000, 4)
    entry = serve(hub, "half.bin", data)
    part = local_path(entry, tmp_path).with_name("half.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:30_000])
    (path,) = fetch(entry, tmp_path)
    assert path.read_bytes() == data
    assert [g.range for g in content_gets(hub, data)] == ["bytes=30000-"]


def test_part_file_of_another_file_is_discarded_and_downloaded_whole(hub, tmp_path):
    data = blob(40_000, 13)
    entry = serve(hub, "stale.bin", data)
    part = local_path(entry, tmp_path).with_name("stale.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(blob(10_000, 14))  # left by a download of some other revision
    assert fetch(entry, tmp_path)[0].read_bytes() == data
    assert [g.range for g in content_gets(hub, data)] == ["bytes=10000-", None]


def test_checksum_mismatch_is_refused_and_the_file_in_place_is_kept(hub, tmp_path):
    data = blob(50_000, 5)
    entry = serve(hub, "model.bin", data)
    (path,) = fetch(entry, tmp_path)
    hub.corrupt.add(f"/lfs/{sha(data)}")

    with pytest.raises(ChecksumError) as raised:
        fetch(entry, tmp_path, force=True)
    text = str(raised.value)
    assert entry.key in text and sha(data) in text and sha(bytes(b ^ 0xFF for b in data)) in text
    assert str(path) in text
    assert path.read_bytes() == data and not path.with_name("model.bin.part").exists()

    stale = blob(50_000, 6)  # a different file of the right size where the checkpoint belongs
    path.write_bytes(stale)
    with pytest.raises(ChecksumError):
        fetch(entry, tmp_path)
    assert path.read_bytes() == stale

    hub.corrupt.clear()
    assert fetch(entry, tmp_path)[0].read_bytes() == data  # a good download replaces the stale file


def test_mirror_serving_a_different_size_is_refused_before_downloading(hub, tmp_path):
    data = blob(20_000, 7)
    entry = serve(hub, "sized.bin", data, size=len(data) + 1)
    with pytest.raises(fetch_mod.DownloadError, match="refusing"):
        fetch(entry, tmp_path)
    assert not local_path(entry, tmp_path).exists()


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_uses_only_what_is_present_and_names_what_is_missing(hub, tmp_path, monkeypatch, how):
    here, gone = blob(10_000, 8), blob(10_000, 9)
    present, missing = serve(hub, "here.bin", here), serve(hub, "gone.bin", gone)
    local_path(present, tmp_path).parent.mkdir(parents=True)
    local_path(present, tmp_path).write_bytes(here)
    offline = None
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        offline = True

    assert fetch(present, tmp_path, offline=offline) == [local_path(present, tmp_path)]
    with pytest.raises(MissingWeightsError) as raised:
        fetch([present, missing], tmp_path, offline=offline)
    text = str(raised.value)
    assert "Offline" in text and str(local_path(missing, tmp_path).parent) in text and "gone.bin" in text
    assert "here.bin" not in text
    assert hub.requests == []


def test_file_without_known_checksum_is_never_downloaded(hub, tmp_path):
    entry = serve(hub, "unknown.bin", blob(1000, 10), sha256=None, size=None)
    with pytest.raises(MissingWeightsError, match="checksum is not known"):
        fetch(entry, tmp_path)
    assert hub.requests == []
    local_path(entry, tmp_path).parent.mkdir(parents=True)
    local_path(entry, tmp_path).write_bytes(b"placed by hand")
    assert fetch(entry, tmp_path) == [local_path(entry, tmp_path)]


def test_plain_https_source_and_status_after_tampering(hub, tmp_path):
    data = blob(40_000, 11)
    hub.static["/static/landmarker.task"] = data
    entry = WeightFile("tiny/landmarker.task", "tiny", "landmarker", "narrate/tiny/landmarker.task", "Apache-2.0",
                       sha(data), len(data), url=hub.url + "/static/landmarker.task")
    (path,) = fetch(entry, tmp_path)
    assert path.read_bytes() == data and status(tmp_path, [entry])[0].verified is True

    path.write_bytes(data[:-1] + b"\0")  # same size, new bytes: unknown until hashed again
    assert status(tmp_path, [entry])[0] == (entry, True, None)
    assert status(tmp_path, [entry], rehash=True)[0].verified is False
    path.write_bytes(data[:100])
    assert status(tmp_path, [entry])[0].verified is False


def test_command_line_download_and_offline(hub, tmp_path, monkeypatch, capsys):
    data = blob(30_000, 12)
    entry = serve(hub, "cli.bin", data)
    monkeypatch.setitem(weights.BUNDLES, "tiny", (entry,))

    assert cli(["download", "tiny", "--models-dir", str(tmp_path / "gone"), "--offline"]) == 1
    assert "python -m narrate_model download tiny" in capsys.readouterr().err
    assert cli(["download", "tiny", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(local_path(entry, tmp_path)) and "MIT License" in out.err
    assert cli(["list", "--models-dir", str(tmp_path)]) == 0
    assert "tiny/cli.bin" in capsys.readouterr().out


# --- conversion --------------------------------------------------------------------------------------------------

@dataclass
class XttsConfig:  # pickled under upstream's module path below, like XTTS's Coqpit config in model.pth
    model: str = "xtts"
    layers: int = 30


def test_convert_pth_to_safetensors_round_trips_exactly(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    wte = torch.randn(6, 4, generator=g)
    base = torch.randn(8, 5, generator=g)
    state = {
        "gpt.wte.weight": wte,
        "gpt.lm_head.weight": wte,               # tied: one storage, two names
        "conv.weight": base.t(),                 # non-contiguous view
        "half.weight": torch.randn(3, 3, generator=g).half(),
        "step.count": torch.tensor(7),
    }
    packages = ("TTS", "TTS.tts", "TTS.tts.configs", "TTS.tts.configs.xtts_config")
    for name in packages:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    XttsConfig.__module__ = packages[-1]
    sys.modules[packages[-1]].XttsConfig = XttsConfig
    pth = tmp_path / "model.pth"
    torch.save({"model": state, "config": XttsConfig(), "epoch": 3}, pth)
    for name in packages:  # loading must neither need nor run upstream classes
        monkeypatch.delitem(sys.modules, name)

    out = convert_to_safetensors(pth)
    loaded = load_file(str(out))
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["nfy_source_sha256"] == sha(pth.read_bytes()) and meta["nfy_source_inner_key"] == "model"
    assert "TTS.tts.configs.xtts_config.XttsConfig" in json.loads(meta["nfy_dropped"])

    entry = WeightFile("tiny/model.pth", "tiny", "tiny", "model.pth", "MIT", sha(pth.read_bytes()), pth.stat().st_size)
    assert trusted_conversion(entry, tmp_path) == out
    other = WeightFile("tiny/model.pth", "tiny", "tiny", "model.pth", "MIT", "0" * 64, 1)
    assert trusted_conversion(other, tmp_path) is None

    flat = tmp_path / "net.pth"  # Hallo-style: the state dict at the top level
    torch.save({"a.weight": base}, flat)
    assert torch.equal(load_file(str(convert_to_safetensors(flat)))["a.weight"], base)


def test_pth_without_tensors_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 1}, bad)
    with pytest.raises(CheckpointError, match="no tensors"):
        convert_to_safetensors(bad)


# --- no network at import time -----------------------------------------------------------------------------------

PROBE = r"""
import importlib, json, pkgutil, socket, sys
attempts = []
def refuse_connect(self, address, *args, **kwargs):
    if self.family != socket.AF_UNIX:
        attempts.append(f"connect {address!r}")
        raise OSError("network access at import time")
    return real_connect(self, address, *args, **kwargs)
def refuse_lookup(host, *args, **kwargs):
    attempts.append(f"getaddrinfo {host!r}")
    raise socket.gaierror("network access at import time")
real_connect = socket.socket.connect
socket.socket.connect = refuse_connect
socket.socket.connect_ex = refuse_connect
socket.getaddrinfo = refuse_lookup
failed = {}
import narrate_model
names = [m.name for m in pkgutil.walk_packages(narrate_model.__path__, "narrate_model.",
                                               onerror=lambda name: failed.setdefault(name, "walk"))]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"modules": names, "attempts": attempts, "failed": failed}))
"""


def test_importing_every_module_touches_no_network():
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"narrate_model.weights", "narrate_model.fetch", "narrate_model.__main__"} <= set(result["modules"])
    assert result["attempts"] == [] and result["failed"] == {}, result
