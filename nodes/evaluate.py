"""Evaluation nodes: Speech Metrics, Video Metrics, Lip Sync, each over narrate_model.evaluate.

Each shows its table in the UI and outputs it as a STRING, plus the whole report as a STRING of JSON (values, better
directions, notes, details such as the A/V offset): plain strings plug into any text node (save, concatenate, show),
and JSON is what a script reading /history or a file wants, so no custom socket type is needed. Model files are
dropdowns over models/narrate/metrics/ (where `python -m narrate_model download lpips-alex fid-inception` puts
them; Whisper: one faster-whisper folder per model under whisper/), preset to the registry's file when it is there.
A model that is not chosen or not present skips its metrics with a note in the table.
"""
from __future__ import annotations

import json
import os

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..narrate_model import evaluate
from ..narrate_model.evaluate.report import text_table, to_dict
from ..narrate_model.evaluate_cli import METRIC_WEIGHTS
from ..narrate_model.xtts.text import SUPPORTED_LANGUAGES
from .common import CATEGORY, checkpoint_choices, input_errors, model_folder, progress_bar
from .video import LANDMARKER_DEFAULT

EVAL_FOLDER = "narrate_metrics"
WHISPER_MARKER = "model.bin"  # CTranslate2's weights file: marks a faster-whisper model folder
NONE = "none"


def whisper_choices() -> list[str]:
    """none, then the sub-folders of models/narrate/metrics/ that hold a CTranslate2 model.bin."""
    return [NONE] + checkpoint_choices(EVAL_FOLDER, WHISPER_MARKER)


def weight_choices() -> list[str]:
    """Weight files under models/narrate/metrics/ (SyncNet's ends in .model), leaving out Whisper folders' files."""
    kinds = set(folder_paths.supported_pt_extensions) | {".model"}
    whisper = set(whisper_choices()[1:])
    files = [f for f in checkpoint_choices(EVAL_FOLDER)
             if os.path.splitext(f)[1] in kinds and os.path.dirname(f) not in whisper]
    return [NONE] + files


def weights_input(name: str, tooltip: str) -> io.Combo.Input:
    """A weights dropdown preset to the registry's file for this metric when it is in place, else none."""
    from ..narrate_model.weights import resolve

    options = weight_choices()
    registered = resolve(METRIC_WEIGHTS[name])[0].dest.split("/", 2)[2]  # narrate/metrics/<this>
    return io.Combo.Input(name, options=options, default=registered if registered in options else NONE,
                          tooltip=f"{tooltip} in models/narrate/metrics/ (`python -m narrate_model list` says how to "
                                  f"get it); none skips them.")


def _model_path(choice: str, folder: str, what: str, notes: list[str], marker: str | None = None) -> str | None:
    """The full path of a dropdown choice, or None with a note saying where the file goes when it is absent."""
    if choice == NONE:
        return None
    for base in folder_paths.get_folder_paths(folder):
        path = os.path.join(base, choice)
        if os.path.exists(os.path.join(path, marker) if marker else path):
            return path
    notes.append(f"{what} {choice} not found: put it in {os.path.join(model_folder(folder), choice)} "
                 f"(its metrics are skipped)")
    return None


def _audio(audio: dict):
    """A ComfyUI AUDIO as the library's (waveform [C,T], sample_rate); the first item of a batch."""
    return audio["waveform"][0], int(audio["sample_rate"])


def _run(node: str, title: str, fn, *args, notes: list[str], frames: int = 0) -> io.NodeOutput:
    """Calls the library with the node's notes in front of its own; with `frames`, the library advances the bar (and
    checks Cancel) once per frame, otherwise the call is one step."""
    progress = progress_bar(frames or 1)
    mm.throw_exception_if_processing_interrupted()
    with input_errors(node):
        result = fn(*args, progress=progress) if frames else fn(*args)
    if not frames:
        progress(1, 1)
    result.notes[:0] = notes
    table = text_table(result, title)
    return io.NodeOutput(table, json.dumps(to_dict(result), allow_nan=False), ui={"text": [table]})


def _models(**paths) -> "evaluate.MetricModels":
    return evaluate.MetricModels(device=str(mm.get_torch_device()), **paths)


OUTPUTS = [
    io.String.Output(display_name="table", tooltip="The metrics as a text table (also shown on the node)."),
    io.String.Output(display_name="json", tooltip="The report as JSON: values, which direction is better, notes "
                                                  "and details (non-finite values as \"inf\" / \"nan\")."),
]


class SpeechMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_SpeechMetrics", display_name="Speech Metrics", category=f"{CATEGORY}/evaluate",
            description="Scores generated speech: against a reference recording STOI/ESTOI, PESQ (wide and narrow "
                        "band), MCD-DTW and speaker similarity (SIM); against the text WER/CER with Whisper. "
                        "Lengths are aligned by DTW and sample rates resampled; what cannot be computed is a note.",
            inputs=[
                io.Audio.Input("generated", tooltip="The speech to score (e.g. the Vocoder's or Narrate's output)."),
                io.Audio.Input("reference", optional=True,
                               tooltip="A recording of the same words by the target speaker, for STOI/ESTOI, PESQ, "
                                       "MCD and SIM. Leave empty to score against the text only."),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="What should have been said, for WER/CER (empty: skipped)."),
                io.Combo.Input("language", options=list(SUPPORTED_LANGUAGES), default="en",
                               tooltip="Language of the speech, for Whisper and the text normaliser."),
                io.Combo.Input("whisper", options=whisper_choices(), default=whisper_choices()[-1],
                               tooltip="A faster-whisper (CTranslate2) model folder in models/narrate/metrics/whisper/ "
                                       "for WER/CER (preset to one that is there); none skips them."),
                io.Combo.Input("speaker_encoder", options=["resemblyzer", NONE], default="resemblyzer",
                               tooltip="Speaker encoder for SIM (resemblyzer's weights ship in its wheel)."),
            ],
            outputs=OUTPUTS, is_output_node=True,
        )

    @classmethod
    def execute(cls, generated, language="en", whisper=NONE, speaker_encoder="resemblyzer", reference=None,
                text="") -> io.NodeOutput:
        notes: list[str] = []
        models = _models(whisper_dir=_model_path(whisper, EVAL_FOLDER, "Whisper model", notes, WHISPER_MARKER),
                         speaker_encoder=None if speaker_encoder == NONE else speaker_encoder)
        ref = _audio(reference) if reference is not None else None
        return _run("Speech Metrics", "Speech metrics", evaluate.evaluate_speech, _audio(generated), ref,
                    text or None, language, models, notes=notes)


class VideoMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_VideoMetrics", display_name="Video Metrics", category=f"{CATEGORY}/evaluate",
            description="Scores generated frames against reference frames: PSNR and SSIM always; LPIPS, FID "
                        "(Inception) and FVD (I3D) when their weights are chosen. Batches of different lengths are "
                        "trimmed to the shorter one (noted).",
            inputs=[
                io.Image.Input("generated", tooltip="The generated frames (an IMAGE batch)."),
                io.Image.Input("reference", tooltip="The ground-truth frames, same size, in the same order."),
                weights_input("lpips", "LPIPS v0.1 AlexNet heads (alex.pth, AlexNet's weights beside it)"),
                weights_input("inception", "pytorch-fid's Inception weights for FID"),
                weights_input("i3d", "I3D (Kinetics-400) weights for FVD"),
            ],
            outputs=OUTPUTS, is_output_node=True,
        )

    @classmethod
    def execute(cls, generated, reference, lpips=NONE, inception=NONE, i3d=NONE) -> io.NodeOutput:
        notes: list[str] = []
        models = _models(lpips=_model_path(lpips, EVAL_FOLDER, "LPIPS weights", notes),
                         inception=_model_path(inception, EVAL_FOLDER, "Inception weights", notes),
                         i3d=_model_path(i3d, EVAL_FOLDER, "I3D weights", notes), speaker_encoder=None)
        return _run("Video Metrics", "Video metrics", evaluate.evaluate_video, generated, reference, models,
                    notes=notes)


class LipSync(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_LipSync", display_name="Lip Sync", category=f"{CATEGORY}/evaluate",
            description="How well the mouth follows the speech: LSE-C / LSE-D with SyncNet weights, and a PROXY "
                        "without them: the correlation of the mouth opening (MediaPipe landmarks) with the speech "
                        "envelope, searched over frame lags; its best lag is the A/V offset (positive: audio late).",
            inputs=[
                io.Image.Input("images", tooltip="The video frames (an IMAGE batch), one face per frame."),
                io.Audio.Input("audio", tooltip="The soundtrack of those frames."),
                io.Float.Input("fps", default=25.0, min=1.0, max=240.0, step=0.001,
                               tooltip="Frames per second of the images (Hallo: 25)."),
                weights_input("syncnet", "SyncNet's syncnet_v2.model for LSE-C/LSE-D (without it: the proxy only)"),
                io.Combo.Input("landmarker", options=checkpoint_choices("narrate_face_analysis", None,
                                                                       LANDMARKER_DEFAULT),
                               default=LANDMARKER_DEFAULT,
                               tooltip="MediaPipe's face landmarker .task in models/narrate/face_analysis/, for "
                                       "the lip-sync proxy."),
            ],
            outputs=OUTPUTS, is_output_node=True,
        )

    @classmethod
    def execute(cls, images, audio, fps=25.0, syncnet=NONE, landmarker=LANDMARKER_DEFAULT) -> io.NodeOutput:
        notes: list[str] = []
        models = _models(syncnet=_model_path(syncnet, EVAL_FOLDER, "SyncNet weights", notes),
                         landmarker=_model_path(landmarker, "narrate_face_analysis", "Face landmarker", notes),
                         speaker_encoder=None)
        return _run("Lip Sync", "Lip sync", evaluate.evaluate_sync, images, _audio(audio), float(fps), models,
                    notes=notes, frames=images.shape[0])


NODES: list[type[io.ComfyNode]] = [SpeechMetrics, VideoMetrics, LipSync]
