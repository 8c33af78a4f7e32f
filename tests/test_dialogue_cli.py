"""`python -m narrate_model dialogue`: a script and two speakers from the shared media into an .mp4 and its .srt
against a running server (as the narrate command is tested), and a bad cast refused before any server is used."""
import subprocess
import sys

import av
import srt

from conftest import MEDIA, REPO
from test_dialogue_server import voice_wav
from test_workflows import SMALL_SETTINGS


def dialogue(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "narrate_model", "dialogue", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


def small_overrides(small: dict) -> list[str]:
    """The dialogue workflow's loaders (nodes 3-6) on the small checkpoints, at a CPU test's size."""
    sets = {"3.checkpoint": small["XTTS-v2"], "4.vae_name": small["sd-vae-ft-mse.safetensors"],
            "5.checkpoint": small["net.pth"], "6.model": small["wav2vec2-base-960h"], **SMALL_SETTINGS,
            "max_codes": 5, "cfg": 1.0}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def test_cli_speaks_a_script_into_a_video_and_subtitles(comfy_server, small_models, tmp_path):
    script = tmp_path / "talk.txt"
    script.write_text("Ann: Good morning.\nBob: Morning, Ann!\n")
    out = tmp_path / "talk.mp4"
    done = dialogue(["--server", comfy_server.url, "--script", str(script),
                     "--speaker", f"Ann={MEDIA / 'images' / 'Woman.png'},{voice_wav(tmp_path, 'Woman.mp4')}",
                     "--speaker", f"Bob={MEDIA / 'images' / 'man.jpg'},{voice_wav(tmp_path, 'man.mp4')},en,1.2",
                     "--layout", "cut", "--seed", "3", "--out", str(out), *small_overrides(small_models)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    with av.open(str(out)) as c:
        assert [s.codec_context.name for s in c.streams] == ["h264", "aac"]
        assert (c.streams.video[0].width, c.streams.video[0].height) == (64, 64)  # cut: one panel
    cues = list(srt.parse(out.with_suffix(".srt").read_text()))
    assert [c.content for c in cues] == ["Ann: Good morning.", "Bob: Morning, Ann!"]
    assert cues[0].end <= cues[1].start


def test_cli_refuses_a_bad_cast_before_using_any_server(tmp_path):
    script = tmp_path / "talk.txt"
    script.write_text("A: hi\n")
    portrait, voice = MEDIA / "images" / "man.jpg", MEDIA / "videos" / "man.mp4"
    unreachable = ["--server", "http://127.0.0.1:9"]  # nothing listens there: an error from it would say so
    seven = [arg for i in range(7) for arg in ("--speaker", f"S{i}={portrait},{voice}")]
    cases = [(seven, "7 speakers given; a dialogue has 1 to 6"),
             (["--speaker", f"A={portrait},{voice}", "--speaker", f"a={portrait},{voice}"], "the same name"),
             (["--speaker", f"A={portrait}"], "expected NAME=portrait.png,voice.wav"),
             (["--speaker", f"A={portrait},{tmp_path / 'none.wav'}"], "no file"),
             ([], "give each speaker with --speaker")]
    for speakers, expected in cases:
        done = dialogue([*unreachable, "--script", str(script), *speakers])
        assert done.returncode != 0 and expected in done.stderr, (speakers, done.stderr[-2000:])
        assert "Connection refused" not in done.stderr
