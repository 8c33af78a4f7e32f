"""What every node module shares: the pack's custom types, progress with Cancel, error wording, model folders and
ComfyUI's memory management. Node modules stay thin by leaning on this file."""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..narrate_model import av
from ..narrate_model.errors import CheckpointError, NarrateInputError

CATEGORY = "Narrate"

# Custom types: model handles and embeddings only, always NFY_-prefixed; everything else flows as a core type.
XTTS = io.Custom("NFY_XTTS")
HALLO = io.Custom("NFY_HALLO")
WAV2VEC = io.Custom("NFY_WAV2VEC")
ENTANGLER = io.Custom("NFY_ENTANGLER")
VOICE = io.Custom("NFY_VOICE")
FACE = io.Custom("NFY_FACE")
TOKENS = io.Custom("NFY_TOKENS")
SPEECH_LATENTS = io.Custom("NFY_SPEECH_LATENTS")
AUDIO_FEATURES = io.Custom("NFY_AUDIO_FEATURES")

# Where each kind of weight lives under ComfyUI's models/ folder (names as folder_paths knows them), and the file
# types its dropdown lists (None: every file; the loaders of folder checkpoints pick sub-folders by a marker file).
MODEL_FOLDERS = {
    "narrate_xtts": ("narrate/xtts", None),  # one sub-folder per XTTS checkpoint: config.json, model.pth, vocab.json
    "narrate_hallo": ("narrate/hallo", "weights"),  # net.pth (or .safetensors); a same-name .json describes a layout
    "narrate_motion_module": ("narrate/motion_module", "weights"),  # mm_sd_v15_v2.ckpt
    "narrate_wav2vec2": ("narrate/wav2vec2", None),  # one sub-folder per model, e.g. wav2vec2-base-960h/
    "narrate_face_analysis": ("narrate/face_analysis", {".task", ".onnx"}),  # MediaPipe landmarker, ArcFace
    "narrate_entangle": ("narrate/entangle", {".safetensors"}),  # NFY entanglement transformers
    "narrate_metrics": ("narrate/metrics", None),  # evaluation weights; Whisper folders under whisper/
}


def register_model_folders() -> None:
    """Adds the pack's model folders to folder_paths (models/narrate/...), creating nothing on disk."""
    for name, (rel, kinds) in MODEL_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, *rel.split("/"))
        extensions = set(folder_paths.supported_pt_extensions) if kinds == "weights" else set(kinds or ())
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([path], extensions)
        elif path not in folder_paths.folder_names_and_paths[name][0]:
            folder_paths.folder_names_and_paths[name][0].append(path)


def model_folder(name: str) -> str:
    """The first (default) folder for a kind of weight, for messages that say where a file goes."""
    return folder_paths.get_folder_paths(name)[0]


def progress_bar(total: int):
    """A library progress callback: raises if the user pressed Cancel (checked on every call, which the library
    makes often, down to every submodule of a long forward pass) and moves ComfyUI's bar when the numbers change."""
    bar = comfy.utils.ProgressBar(total)
    shown = None

    def progress(done: int, total_now: int) -> None:
        nonlocal shown
        mm.throw_exception_if_processing_interrupted()
        if (done, total_now) != shown:
            shown = (done, total_now)
            bar.update_absolute(done, total_now)

    return progress


def _notes(e: BaseException) -> str:
    return "".join(f" ({note})" for note in getattr(e, "__notes__", ()))


def show_text(text: str) -> None:
    """Text on the running node in the browser (ComfyUI's progress text), for what happens as it stops."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # an older ComfyUI without progress text: the log line below still says it
        context = None
    else:
        context = get_executing_context()
    if context is not None and PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, context.node_id)
    logging.warning(text)


@contextlib.contextmanager
def input_errors(node_name: str):
    """Re-raises library input errors with the node's name in front, so the user knows where to look. Notes the
    library adds to an exception as it stops (e.g. that an unfinished video was removed) reach the user too: in the
    error message, or for a Cancel (which ComfyUI reports without a message) as text on the node."""
    try:
        yield
    except NarrateInputError as e:
        raise ValueError(f"{node_name}: {e}{_notes(e)}") from e
    except mm.InterruptProcessingException as e:
        if getattr(e, "__notes__", None):
            show_text(f"{node_name}: cancelled;{_notes(e)}")
        raise
    except Exception as e:
        if not getattr(e, "__notes__", None):
            raise
        raise RuntimeError(f"{node_name}: {type(e).__name__}: {e}{_notes(e)}") from e


def first_image(node_name: str, images: torch.Tensor, notes: list[str]) -> torch.Tensor:
    """The portrait of an IMAGE batch: the first image, and a note saying so when the batch holds more."""
    if images.shape[0] > 1:
        notes.append(f"the image input is a batch of {images.shape[0]} images; {node_name} uses the first one")
    return images[0]


@contextlib.contextmanager
def checkpoint_errors(node_name: str, input_name: str):
    """Re-raises a loader's CheckpointError (wrong model, mismatched keys) naming the node and its input."""
    try:
        yield
    except CheckpointError as e:
        raise ValueError(f"{node_name}: input '{input_name}': {e}") from e


class Managed(torch.nn.Module):
    """The holder ComfyUI's ModelPatcher manages: it writes bookkeeping attributes (device, lowvram flags) onto the
    module it is given, so it gets this shell rather than the library's model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


def patcher(module, size: int = 0):
    """Wraps a torch module so ComfyUI can load it to the GPU, offload it, and free it with the rest."""
    return comfy.model_patcher.ModelPatcher(
        Managed(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(), size=size)


def load_to_device(model_patcher):
    """Asks ComfyUI's model management for room, moves the model onto the compute device and returns it."""
    return load_together([model_patcher])[0]


def load_together(model_patchers: list) -> list:
    """Several models onto the compute device in ONE model-management call, so ComfyUI makes room for all of them at
    once (one call per model can offload the first to fit the next on a small card); returns the modules in order."""
    mm.load_models_gpu(list(model_patchers))
    return [p.model.model for p in model_patchers]


def compute_device() -> torch.device:
    return mm.get_torch_device()


def checkpoint_choices(folder_name: str, marker: str | None = None, default: str | None = None) -> list[str]:
    """What a loader's dropdown offers: files under the folder, or (with `marker`) the sub-folders that hold that
    file; only what exists (an empty list when nothing is there), so the frontend flags a workflow's absent model
    and its missing-models dialog offers the workflow's download metadata. The expected default comes first."""
    try:
        files = folder_paths.get_filename_list(folder_name)
    except KeyError:
        files = []
    if marker:
        found = {os.path.dirname(f) for f in files if os.path.basename(f) == marker and os.path.dirname(f)}
    else:
        found = set(files)
    return sorted(found, key=lambda name: (name != default, name))


def locate_checkpoint(node_name: str, input_name: str, folder_name: str, choice: str, marker: str | None = None,
                      how_to_get: str = "") -> str:
    """The full path of a dropdown choice; if it is not on disk, an error that says what goes where."""
    for base in folder_paths.get_folder_paths(folder_name):
        path = os.path.join(base, choice)
        if os.path.exists(os.path.join(path, marker) if marker else path):
            return path
    where = os.path.join(model_folder(folder_name), choice)
    what = f"{where}{os.sep}{marker}" if marker else where
    raise ValueError(f"{node_name}: input '{input_name}': {what} is missing. {how_to_get}".strip())


def registry_help(bundle: str) -> str:
    """For each file of a known checkpoint that is not in place: the file, the folder, the licence and the command
    that fetches it (from narrate_model.weights, the one registry of what the pack uses)."""
    from ..narrate_model.weights import local_path, missing_message, resolve

    models = folder_paths.models_dir
    return "\n\n".join(missing_message(e, models) for e in resolve(bundle) if not local_path(e, models).is_file())


def licence_of(key: str) -> str:
    from ..narrate_model.weights import licence_notice, resolve

    return licence_notice(resolve(key)[0])


def output_mp4(prefix: str, width: int, height: int) -> tuple[str, dict]:
    """A new .mp4 path under ComfyUI's output folder and its UI/history entry. Never an existing file: the counter
    goes up until neither the file nor its unfinished '.partial' twin exists (ComfyUI's own counter only looks at
    names that start with the prefix's last part, so a prefix ending in '/' would always get 00001)."""
    out_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    while True:
        filename = f"{name}_{counter:05}_.mp4"
        path = os.path.join(out_dir, filename)
        if not os.path.exists(path) and not os.path.exists(av.partial_path(path)):
            return path, {"filename": filename, "subfolder": subfolder, "type": "output"}
        counter += 1
