"""The command line narrates a portrait from the shared media into an .mp4: against a running server, and with a
ComfyUI it starts headless for the job."""
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


def narrate(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "narrate_model", "narrate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


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
