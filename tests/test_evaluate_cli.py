"""`python -m narrate_model evaluate` on the shared media: the clips against themselves (every metric at its perfect
score) and a degraded copy of them (noise + blur on the frames, noise on the speech) against the originals (every
reference-based metric worse). Each run writes metrics.csv, the paper-layout table, metrics.json and two PNG plots
of the expected pixel size with real content; an unreadable file and a missing model are notes, not failures.
`benchmark-quality` runs the narrate_simple workflow on the real server with the small checkpoints, then evaluates."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MEDIA, REPO
from test_evaluate_server import whisper_folder

SECONDS = 2.0  # the first seconds of each clip, at SIDE x SIDE pixels: every metric runs, in CI's time budget
SIDE = 160
CLIPS = ["man.mp4", "Woman.mp4"]
REFERENCE_BASED = ["psnr", "ssim", "stoi", "estoi", "pesq_wb", "pesq_nb", "mcd", "sim"]


def evaluate_here(args: list) -> tuple[int, str, str]:
    """The same command line in this process (the metric models load once for every run of the module)."""
    import contextlib
    import io

    from narrate_model.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def write_clip(src, dst, degrade: bool = False, seed: int = 0) -> None:
    """The first SECONDS of a shared clip at SIDE x SIDE as h264 + aac; with `degrade`, Gaussian noise (sigma 0.06)
    after a 5x5 box blur on the frames and white noise 10 dB below the speech."""
    from narrate_model.av import write_mp4
    from narrate_model.evaluate_cli import read_clip

    clip = read_clip(src, SECONDS)
    x = torch.nn.functional.interpolate(clip.frames.permute(0, 3, 1, 2), size=(SIDE, SIDE), mode="area")
    wave, rate = clip.audio
    if degrade:
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        x = (x + 0.06 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        noise = torch.randn(wave.shape, generator=g)
        noise *= wave.square().mean().sqrt() / noise.square().mean().sqrt() / math.sqrt(10)
        wave = (wave + noise).clamp(-1, 1)
    write_mp4(str(dst), x.permute(0, 2, 3, 1), clip.fps, wave, rate, crf=18)


def read_csv(path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["sample"], {})[row["metric"]] = float(row["value"])
    return out


def check_png(path, size: tuple[int, int]) -> None:
    """A real plot: a PNG of exactly `size` pixels with drawn content (not one flat colour, enough ink)."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size, (im.format, im.size, size)
        grey = np.asarray(im.convert("L"))
    assert grey.min() < 100 and (grey < 200).mean() > 0.005, "the plot is (almost) blank"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """reference/ (short small copies of the shared clips), same/ (the same files), degraded/ (noisy blurred
    copies); same/ also holds an unreadable file and a clip without a reference."""
    root = tmp_path_factory.mktemp("evaluate")
    for name in ("reference", "same", "degraded"):
        (root / name).mkdir()
    for clip in CLIPS:
        write_clip(MEDIA / "videos" / clip, root / "reference" / clip)
        (root / "same" / clip).symlink_to(root / "reference" / clip)
        write_clip(root / "reference" / clip, root / "degraded" / clip, degrade=True)
    (root / "same" / "broken.mp4").write_bytes(b"not a video")
    write_clip(MEDIA / "videos" / "kid_1.mp4", root / "same" / "kid_1.mp4")  # no reference of that name
    return root


@pytest.fixture(scope="module")
def runs(media, face_landmarker_task):
    """The command line on same/ and on degraded/, against reference/, with transcripts, Whisper and the landmarker;
    an LPIPS file that does not exist."""
    out = {}
    for name in ("same", "degraded"):
        code, stdout, stderr = evaluate_here(
            ["--generated", media / name, "--reference", media / "reference", "--text-from", MEDIA / "samples.json",
             "--out", media / f"out_{name}", "--whisper", whisper_folder(), "--landmarker", face_landmarker_task,
             "--lpips", media / "missing_lpips.pth"])
        assert code == 0, stderr
        out[name] = (media / f"out_{name}", stdout, stderr)
    return out


def test_the_clips_against_themselves_score_perfectly(runs):
    out, _, stderr = runs["same"]
    values = read_csv(out / "metrics.csv")
    for clip in ("man", "Woman"):
        v = values[clip]
        assert v["psnr"] == math.inf and v["ssim"] == pytest.approx(1.0)
        assert v["stoi"] == pytest.approx(1.0, abs=1e-6) and v["estoi"] == pytest.approx(1.0, abs=1e-6)
        assert v["mcd"] == pytest.approx(0.0, abs=1e-6) and v["sim"] == pytest.approx(1.0, abs=1e-4)
        assert v["pesq_wb"] > 4.5 and v["pesq_nb"] > 4.4
        assert 0 < v["wer"] < 1  # Whisper heard the first 2 s of the words in the clip's whole transcript
        assert "lipsync_proxy_corr" in v
    # the clip without a reference still gets what needs none; the unreadable file is a note of its own sample
    assert "lipsync_proxy_corr" in values["kid_1"] and "psnr" not in values["kid_1"]
    notes = json.loads((out / "metrics.json").read_text())["samples"]
    assert any("could not read" in n for n in notes["broken"]["notes"])
    assert any("no reference" in n for n in notes["kid_1"]["notes"])
    assert any("lpips" in n.lower() for n in notes["man"]["notes"])  # the missing LPIPS file: skipped, noted
    assert "note: broken: could not read" in stderr


def worse(name: str, degraded: float, clean: float) -> bool:
    from narrate_model.evaluate import METRICS

    return degraded < clean if METRICS[name].better == "higher" else degraded > clean


def test_the_degraded_copy_scores_worse_on_every_reference_based_metric(runs):
    same, degraded = read_csv(runs["same"][0] / "metrics.csv"), read_csv(runs["degraded"][0] / "metrics.csv")
    for clip in ("man", "Woman"):
        for name in REFERENCE_BASED:
            assert worse(name, degraded[clip][name], same[clip][name]), (clip, name, degraded[clip], same[clip])
    # the guard itself: the clean run does not count as worse than itself
    assert not any(worse(n, same["man"][n], same["man"][n]) for n in REFERENCE_BASED)


def test_the_table_and_the_plots_are_written(runs):
    from narrate_model.evaluate.report import bar_figure_size, histogram_size

    for name, (out, stdout, _) in runs.items():
        values = read_csv(out / "metrics.csv")
        metrics = list(dict.fromkeys(m for v in values.values() for m in v))
        table = (out / "metrics.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Metric")]
        assert [r.split("|")[1].strip() for r in rows] == metrics  # one row per metric, in the CSV's order
        psnr_row = next(r for r in rows if r.startswith("| psnr "))
        n = sum("psnr" in v for v in values.values())
        assert psnr_row.endswith(f"| {n} |") and "↑" in psnr_row
        assert ("inf" in psnr_row) == (name == "same")
        assert table.splitlines()[2] in stdout  # the table is also printed
        check_png(out / "per_sample.png", bar_figure_size(len(metrics)))
        check_png(out / "av_offset.png", histogram_size())
    # the PNG check itself fails on a blank image of the right size
    blank = runs["same"][0] / "blank.png"
    Image.new("RGB", histogram_size(), "white").save(blank)
    with pytest.raises(AssertionError):
        check_png(blank, histogram_size())


def test_bad_folders_are_an_argument_error(tmp_path):
    with pytest.raises(SystemExit, match="--generated .*nope: not a folder"):
        evaluate_here(["--generated", tmp_path / "nope", "--reference", tmp_path])


def test_benchmark_quality_generates_each_row_then_evaluates(comfy_server, small_models, tmp_path):
    from test_cli import small_overrides
    from test_server_video import clip_wav

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"id": "man", "portrait": str(MEDIA / "images" / "man.jpg"),
                                 "voice": str(clip_wav(tmp_path, 4.0)), "text": "One row of the benchmark.",
                                 "reference": str(MEDIA / "videos" / "man.mp4")}]))
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "narrate_model", "benchmark-quality", "--rows", str(rows),
                           "--server", comfy_server.url, "--seed", "3", "--out", str(out), "--max-seconds", "2",
                           "--models-dir", str(comfy_server.base / "models"), "--speaker-encoder", "none",
                           *small_overrides(small_models)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    with av.open(str(out / "generated" / "man.mp4")) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (64, 64)  # the workflow's --set size
    assert (out / "reference" / "man.mp4").read_bytes() == (MEDIA / "videos" / "man.mp4").read_bytes()
    values = read_csv(out / "metrics.csv")["man"]
    assert {"psnr", "ssim", "stoi", "mcd"} <= set(values) and math.isfinite(values["psnr"])
    notes = json.loads((out / "metrics.json").read_text())["samples"]["man"]["notes"]
    # the landmarker was found in --models-dir: the proxy ran (the random small models draw no face)
    assert "lipsync_proxy_corr" in values or any("no face" in n for n in notes), notes
    assert not any("landmarker" in n for n in notes), notes
    assert any("resized from 512x512 to 64x64" in n for n in notes)


def test_the_summary_is_mean_and_std_over_the_samples_that_have_a_value():
    from narrate_model.evaluate import MetricReport
    from narrate_model.evaluate.report import markdown_table, to_dict

    reports = {"a": MetricReport({"psnr": 30.0, "mcd": 4.0}), "b": MetricReport({"psnr": 34.0, "mcd": math.nan}),
               "c": MetricReport({"psnr": math.inf})}
    table = markdown_table({k: reports[k] for k in ("a", "b")}).splitlines()
    # population std, to the mean's four significant digits; a nan is not counted
    assert table[2:] == ["| psnr | ↑ | 32.00 ± 2.00 | 2 |", "| mcd | ↓ | 4.000 ± 0.000 | 1 |"]
    assert "| psnr | ↑ | inf | 3 |" in markdown_table(reports)  # an identical clip makes the mean inf
    as_json = json.loads(json.dumps(to_dict(reports["b"]), allow_nan=False))  # strict JSON, nothing lost
    assert as_json["values"] == {"psnr": 34.0, "mcd": "nan"} and as_json["better"]["mcd"] == "lower"
