"""The command line narrates a portrait from the shared media into an .mp4: against a running server, and with a
ComfyUI it starts headless for the job."""
import os
import subprocess
import sys

import av

from conftest import MEDIA, REPO, recorded_path
from test_server_video import clip_wav
from test_workflows import SMALL_SETTINGS


def small_overrides(small: dict) -> list[str]:
    """narrate_simple's loaders (nodes 3-6) pointed at the small checkpoints, at a CPU test's size."""
    sets = {"3.checkpoint": small["XTTS-v2"], "4.vae_name": small["sd-vae-ft-mse.safetensors"],
            "5.checkpoint": small["net.pth"], "6.model": small["wav2vec2-base-960h"], **SMALL_SETTINGS}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def narrate(args: list[str], tmp_path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "narrate_model", "narrate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=None if env is None else {**os.environ, **env})


def check(out):
    with av.open(str(out)) as c:
        assert [s.codec_context.name for s in c.streams] == ["h264", "aac"]  # video first, as players expect
        assert sum(1 for _ in c.decode(video=0)) > 0


def test_cli_narrates_against_a_running_server(comfy_server, small_models, tmp_path):
    out = tmp_path / "man.mp4"
    done = narrate(["--server", comfy_server.url, "--image", str(MEDIA / "images" / "man.jpg"),
                    "--voice", str(clip_wav(tmp_path, 4.0)), "--text", "Hello from the command line.",
                    "--seed", "3", "--out", str(out), *small_overrides(small_models)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    check(out)


def test_cli_starts_comfyui_headless_when_no_server_is_given(comfy_server, small_models, tmp_path):
    out = tmp_path / "headless.mp4"
    comfy_args = f"--cpu --base-directory {comfy_server.base} --disable-api-nodes --database-url sqlite:///:memory:"
    done = narrate(["--comfyui", recorded_path("COMFYUI_DIR"), "--comfyui-args", comfy_args,
                    "--image", str(MEDIA / "images" / "oldMan.jpg"), "--voice", str(clip_wav(tmp_path, 3.0)),
                    "--text", "A second voice, a second face.", "--out", str(out), *small_overrides(small_models)],
                   tmp_path)
    assert done.returncode == 0, done.stderr
    check(out)


def test_cli_says_what_is_missing(tmp_path):
    done = narrate(["--voice", str(tmp_path / "none.wav"), "--text", "Hi."], tmp_path)
    assert done.returncode != 0 and "--image" in done.stderr


# A stand-in ComfyUI main.py: prints its arguments, then either fails the way a CPU-only machine does without
# --cpu, or answers the API without any of this pack's nodes (a ComfyUI the pack is not installed in).
FAKE_MAIN = r"""
import http.server, json, os, sys
print("started with:", " ".join(sys.argv[1:]), flush=True)
if os.environ["FAKE_COMFY"] == "fail":
    print("AssertionError: Torch not compiled with CUDA enabled", flush=True)
    sys.exit(1)
port = int(sys.argv[sys.argv.index("--port") + 1])

class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({} if self.path.startswith("/object_info") else {"system": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("127.0.0.1", port), Api).serve_forever()
"""


def fake_comfyui(tmp_path):
    folder = tmp_path / "ComfyUI"
    folder.mkdir()
    (folder / "main.py").write_text(FAKE_MAIN)
    return folder


def test_a_server_that_fails_to_start_shows_its_log_and_cpu_is_added_without_a_gpu(tmp_path):
    from narrate_model.narrate_cli import gpu_visible

    done = narrate(["--comfyui", str(fake_comfyui(tmp_path)), "--image", str(MEDIA / "images" / "man.jpg"),
                    "--voice", str(tmp_path / "v.wav"), "--text", "Hi."], tmp_path, {"FAKE_COMFY": "fail"})
    assert done.returncode == 1
    assert "Torch not compiled with CUDA enabled" in done.stderr, done.stderr  # the log's tail, not just "exited"
    started = next(line for line in done.stderr.splitlines() if line.startswith("started with:"))
    if gpu_visible():
        assert "--cpu" not in started.split()
    else:
        assert "--cpu" in started.split() and "starting ComfyUI with --cpu" in done.stderr


def test_a_comfyui_without_the_pack_says_how_to_install_it(tmp_path):
    comfyui = fake_comfyui(tmp_path)
    done = narrate(["--comfyui", str(comfyui), "--comfyui-args=--cpu", "--image", str(MEDIA / "images" / "man.jpg"),
                    "--voice", str(tmp_path / "v.wav"), "--text", "Hi."], tmp_path, {"FAKE_COMFY": "serve"})
    assert done.returncode == 1
    assert "nodes are not installed in the ComfyUI" in done.stderr and "NFY_Narrate" in done.stderr, done.stderr
    assert f"{comfyui}/custom_nodes/" in done.stderr and "requirements.txt" in done.stderr
