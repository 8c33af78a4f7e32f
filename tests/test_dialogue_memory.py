"""A dialogue's memory does not grow with its number of turns: the peak resident memory of a 30-turn script stays
within 10 % of a 3-turn script's, each measured in a fresh process with the small fixture models. The same
measure fails a non-streaming variant of the dialogue (its frames collected before writing), so it can tell.

    .venv/bin/python tests/test_dialogue_memory.py --case TURNS LAYOUT [--hold] OUT_DIR   # one case, prints JSON
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ["Hello there.", "Yes, I agree.", "Tell me more.", "That is right.", "Good point."]
NAMES = ["ANN", "BOB", "CY"]
LAYOUT, SIZE = "grid", 64  # grid: three speakers generated all the time on a 2x2 canvas, the heaviest frames


def script(turns: int) -> str:
    return "\n".join(f"{NAMES[i % 3]}: {WORDS[i % len(WORDS)]}" for i in range(turns))


def peak_rss_mb() -> float:
    """VmHWM: this process's peak resident memory (exec resets it, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_case(turns: int, layout: str, hold: bool, out_dir: Path) -> dict:
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import numpy as np
    import torch
    from PIL import Image

    from conftest import MEDIA
    from narrate_model.dialogue import run
    from narrate_model.hallo.sampler import SamplerSettings
    from narrate_model.xtts.sampling import SamplingParams
    from small_checkpoints import small_narration_models
    from test_pipeline import voice_clip

    torch.set_num_threads(1)
    m = small_narration_models()
    images = ["Woman.png", "man.jpg", "oldMan.jpg"]
    with torch.inference_mode():
        speakers = [run.encode_speaker(m.xtts, name, torch.from_numpy(np.asarray(
            Image.open(MEDIA / "images" / image).convert("RGB")).copy()).float() / 255, [voice_clip()],
            m.landmarker) for name, image in zip(NAMES, images)]
    models = run.DialogueModels(m.xtts, m.tokenizer, m.hallo, m.wav2vec, m.vae_encode, m.vae_decode)
    settings = run.DialogueSettings(layout=layout, gap=0.2, size=SIZE,
                                    speech=SamplingParams(seed=1, max_new_tokens=8),
                                    video=SamplerSettings(steps=1, cfg=1.0, seed=1))
    if hold:  # the control: every speaker's run decoded in full and the whole video composed before it is written
        kept, take, write = [], run.SpeakerFrames.take, run.av.write_mp4
        run.SpeakerFrames.take = lambda self, n: kept.append(take(self, n)) or kept[-1]
        run.av.write_mp4 = lambda path, frames, *a, **k: write(path, list(frames), *a, **k)
    start = time.perf_counter()
    path = out_dir / f"{turns}_{hold}_{time.time_ns()}.mp4"
    with torch.inference_mode():
        result = run.dialogue_to_mp4(models, speakers, script(turns), str(path), settings)
    return {"turns": len(result.timeline.turns), "frames": result.frames, "hold": hold,
            "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def measure(turns: int, hold: bool, out_dir: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", str(turns), LAYOUT, "hold" if hold else "stream",
                           str(out_dir)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_thirty_turns_peak_within_ten_percent_of_three_and_a_non_streaming_variant_fails(tmp_path):
    few, many = measure(3, False, tmp_path), measure(30, False, tmp_path)
    held = measure(30, True, tmp_path)
    print(json.dumps({"3 turns": few, "30 turns": many, "30 turns, held": held}))
    assert many["turns"] == 30 and few["turns"] == 3 and many["frames"] > 8 * few["frames"]
    assert many["peak_rss_mb"] <= 1.10 * few["peak_rss_mb"], (few, many)
    assert held["peak_rss_mb"] > 1.10 * few["peak_rss_mb"], (few, held)  # the measure tells a held video apart


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--case":
        print(json.dumps(run_case(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "hold", Path(sys.argv[5]))))
