"""Peak memory of a long narration against a one-sentence narration, through the streaming path.

Each case runs `narrate_model.pipeline.narrate_to_mp4` in a fresh Python process with the small fixture models
(reduced XTTS, Hallo Net, wav2vec2 and VAE; same code paths as the real checkpoints) and records the process's peak
resident memory (VmHWM), the sentence chunks, the frames and the wall time. The long case is a 5,000-character
text; the claim under test: its peak stays within 10 % of the one-sentence narration's, because speech chunks,
video clips and decoded frames are produced and written one at a time.

Motion continuity across sentence chunks is reported as the mean absolute difference between consecutive frames
at the frames where a new sentence chunk starts, next to the same measure over all frames (random weights make the
picture noise-like, so this shows the boundaries are not special, not that the motion is natural).

    .venv/bin/python benchmarks/narration_memory.py            # writes benchmarks/results/narration_memory.json
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "narration_memory.json"
ONE_SENTENCE = "This is one sentence, spoken in a cloned voice."


def long_text(chars: int = 5000) -> str:
    """Real sentences (the shared samples' transcripts, in sentence case) repeated to `chars` characters."""
    samples = json.loads((REPO.parent / "shared" / "media" / "samples.json").read_text())["samples"]
    sentences = [s["text"].capitalize().rstrip(".,") + "." for s in samples]
    text, i = "", 0
    while len(text) < chars:
        text += sentences[i % len(sentences)] + " "
        i += 1
    return text[:chars].rsplit(" ", 1)[0] + "."


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which exec resets (ru_maxrss would carry the parent's peak into
    a child process on Linux and hide what the narration itself used)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the closest there is


def run_case(name: str, out_dir: Path) -> dict:
    """One narration in this process (called in a fresh subprocess per case)."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import av
    import numpy as np
    import torch

    from narrate_model import pipeline
    from narrate_model.hallo.sampler import SamplerSettings
    from narrate_model.xtts.sampling import SamplingParams
    from small_checkpoints import small_narration_models
    from test_pipeline import portrait, voice_clip

    torch.set_num_threads(max(1, os.cpu_count() // 2))
    text = ONE_SENTENCE if name == "one_sentence" else long_text()
    settings = pipeline.NarrationSettings(fps=Fraction(25), size=64,
                                          speech=SamplingParams(seed=1, max_new_tokens=8),
                                          video=SamplerSettings(steps=1, cfg=3.5, seed=1))
    models = small_narration_models()
    path = out_dir / f"{name}.mp4"
    start = time.perf_counter()
    with torch.inference_mode():
        result = pipeline.narrate_to_mp4(models, portrait(), [voice_clip()], text, str(path), settings)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()

    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float32)
    step = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # step[i]: frame i -> i + 1
    return {"case": name, "characters": len(text), "chunks": result.chunks, "frames": result.frames,
            "frames_in_mp4": int(frames.shape[0]), "speech_seconds": result.audio["waveform"].shape[-1] / 24000,
            "wall_seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1),
            "mean_frame_step": float(step.mean()) if len(step) else 0.0,
            "chunk_starts": [int(round(s * 25)) for s in result.chunk_starts[1:]],
            "frame_step_at_chunk_starts": [float(step[int(round(s * 25)) - 1]) for s in result.chunk_starts[1:]
                                           if 0 < round(s * 25) <= len(step)]}


def measure(out_dir: Path = RESULTS.parent) -> dict:
    """Both cases, each in a fresh process; the report with the peak ratio."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name in ("one_sentence", "long_5000_chars"):
        done = subprocess.run([sys.executable, __file__, "--case", name, str(out_dir)], capture_output=True,
                              text=True, check=True)
        cases[name] = json.loads(done.stdout.strip().splitlines()[-1])
        (out_dir / f"{name}.mp4").unlink(missing_ok=True)
    ratio = cases["long_5000_chars"]["peak_rss_mb"] / cases["one_sentence"]["peak_rss_mb"]
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
            "models": "small fixture models (reduced XTTS, Hallo Net, wav2vec2, VAE); 64x64 video, 1 step, "
                      "8 speech codes per chunk", "cases": cases, "peak_ratio_long_over_one": round(ratio, 3),
            "within_10_percent": ratio <= 1.10}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2], Path(sys.argv[3]))))
        return 0
    report = measure()
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    for case in report["cases"].values():
        print(f"{case['case']:>16}: {case['characters']:5d} chars, {case['chunks']:3d} chunks, {case['frames']:4d} "
              f"frames, {case['wall_seconds']:7.1f} s, peak {case['peak_rss_mb']:.0f} MB")
    print(f"peak ratio long / one sentence: {report['peak_ratio_long_over_one']:.3f} "
          f"(within 10 %: {report['within_10_percent']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
