"""`python -m narrate_model prepare VIDEOS... --out DATASET`: talking-head videos -> a cached training set.

The frozen encoders come from a ComfyUI models folder in the pack's layout (`--models-dir`, see weights.py) or from
explicit paths (`--xtts`, `--dvae`, `--mel-stats`, `--vae`, `--wav2vec2`, `--landmarker`), which win.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import CheckpointError, NarrateInputError

# Where each model lives under ComfyUI's models folder (the registry's destinations).
DEFAULT_PATHS = {
    "xtts": "narrate/xtts/XTTS-v2",
    "dvae": "narrate/xtts/XTTS-v2/dvae.pth",
    "mel_stats": "narrate/xtts/XTTS-v2/mel_stats.pth",
    "vae": "vae/sd-vae-ft-mse.safetensors",
    "wav2vec2": "narrate/wav2vec2/wav2vec2-base-960h",
    "landmarker": "narrate/face_analysis/face_landmarker_v2_with_blendshapes.task",
}
# sd-vae-ft-mse's architecture (diffusers AutoencoderKL); a `<vae>.json` next to the file overrides it.
SD_VAE_CONFIG = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                     norm_num_groups=32, sample_size=512)


def add_arguments(p, default_models: Path) -> None:
    p.add_argument("videos", nargs="+", type=Path, metavar="VIDEO",
                   help="video files or folders of them (any container PyAV reads); a transcript NAME.srt or "
                        "NAME.txt next to a video is used as its text")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder (created; a rerun resumes it)")
    p.add_argument("--text-from", type=Path, help="a JSON of texts by video file name (samples.json layout, or "
                                                  '{"NAME.mp4": "text"})')
    p.add_argument("--whisper-model", type=Path, help="a faster-whisper model folder: transcribe clips without a "
                                                      "transcript (needs `pip install faster-whisper`)")
    p.add_argument("--language", default="en", help="the speech's language (XTTS code, default en)")
    p.add_argument("--size", type=int, default=512, help="training resolution of the frames (default 512)")
    p.add_argument("--voice-seconds", type=float, default=2.0,
                   help="length of the voice-profile segment, taken after the target (default 2.0 as in the "
                        "paper; 3-6 s is recommended for better cloning)")
    p.add_argument("--max-seconds", type=float, help="cap on the target length (XTTS was trained on <= 11.6 s)")
    p.add_argument("--models-dir", type=Path, default=default_models,
                   help=f"ComfyUI's models folder (default: {default_models})")
    for name, what in (("xtts", "XTTS-v2 folder (config.json, model.pth/.safetensors, vocab.json)"),
                       ("dvae", "dvae.pth of XTTS-v2"), ("mel-stats", "mel_stats.pth of XTTS-v2 (default: the "
                                                                       "file in the XTTS folder, else model.pth's)"),
                       ("vae", "the SD VAE (diffusers-layout safetensors, e.g. sd-vae-ft-mse)"),
                       ("wav2vec2", "wav2vec2-base-960h folder"), ("landmarker", "MediaPipe face_landmarker.task"),
                       ("identity-model", "optional ArcFace ONNX model for the face-identity embedding")):
        p.add_argument(f"--{name}", type=Path, help=f"path of the {what}")
    p.add_argument("--device", default=None, help="torch device for the encoders (default: cuda if available)")


def _path(args, name: str) -> Path:
    explicit = getattr(args, name.replace("-", "_"))
    return Path(explicit) if explicit else Path(args.models_dir) / DEFAULT_PATHS[name.replace("-", "_")]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{what} not found at {path}; pass --{what} or put it there")
    return path


def _weights_file(folder: Path, names) -> Path:
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"none of {', '.join(names)} in {folder}")
    return found


def load_vae_moments(path: Path, device):
    """A diffusers AutoencoderKL from one safetensors file -> IMAGE -> (latent mean, std), unscaled."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    sidecar = path.with_suffix(".json")
    config = json.loads(sidecar.read_text()) if sidecar.is_file() else SD_VAE_CONFIG
    vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise CheckpointError(f"{path.name} is not an SD VAE in diffusers layout ({str(error)[:300]}); use "
                              "stabilityai/sd-vae-ft-mse's diffusion_pytorch_model.safetensors") from error
    vae = vae.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def moments(pixels):
        x = pixels.permute(0, 3, 1, 2).to(vae.device, vae.dtype) * 2 - 1
        dist = vae.encode(x).latent_dist
        return dist.mean, dist.std
    return moments


def model_files(args) -> dict[str, Path]:
    """The file of every base checkpoint the arguments name (what a dataset records the SHA-256 of; training checks
    the same files against it)."""
    xtts_dir = _require(_path(args, "xtts"), "xtts")
    files = {"xtts": _weights_file(xtts_dir, ("model.safetensors", "model.pth")),
             "xtts_config": xtts_dir / "config.json", "xtts_vocab": xtts_dir / "vocab.json",
             "dvae": _require(_path(args, "dvae"), "dvae"),
             "vae": _require(_path(args, "vae"), "vae"),
             "wav2vec2": _weights_file(_require(_path(args, "wav2vec2"), "wav2vec2"),
                                       ("model.safetensors", "pytorch_model.bin")),
             "landmarker": _require(_path(args, "landmarker"), "landmarker")}
    mel_stats = _path(args, "mel-stats")
    if args.mel_stats or mel_stats.is_file():
        files["mel_stats"] = _require(mel_stats, "mel-stats")
    if args.identity_model:
        files["identity_model"] = _require(args.identity_model, "identity-model")
    return files


def load_models(args):
    """The frozen encoders named by the arguments, and the SHA-256 of every file they were read from."""
    import torch

    from ..hallo.audio import load_wav2vec
    from ..weights import sha256_file
    from ..xtts.checkpoint import load_xtts
    from ..xtts.dvae import load_dvae, load_mel_stats
    from ..xtts.text import XttsTokenizer
    from .data import PrepareModels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = model_files(args)
    xtts, _ = load_xtts(files["xtts"].parent, device=device)
    models = PrepareModels(
        xtts=xtts, tokenizer=XttsTokenizer(files["xtts_vocab"]), dvae=load_dvae(files["dvae"], device),
        # mel_stats.pth is the same 80-vector model.pth carries: without the file, take the loaded model's
        mel_norms=load_mel_stats(files["mel_stats"]) if "mel_stats" in files else xtts.mel_stats.detach().cpu(),
        vae_moments=load_vae_moments(files["vae"], device),
        wav2vec=load_wav2vec(files["wav2vec2"].parent).to(device),
        landmarker=str(files["landmarker"]),
        identity_model=str(files["identity_model"]) if "identity_model" in files else None)
    models.checkpoints = {name: {"file": path.name, "sha256": sha256_file(path)} for name, path in files.items()}
    return models


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\rpreparing [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr,
          flush=True)


def run(args) -> int:
    from .data import PrepareSettings, check_dataset_settings, load_text_map, prepare

    settings = PrepareSettings(size=args.size, voice_seconds=args.voice_seconds, max_seconds=args.max_seconds,
                               language=args.language)
    try:
        settings.check()
        check_dataset_settings(args.out, settings)
        text_map = load_text_map(args.text_from) if args.text_from else None
        models = load_models(args)
        result = prepare(args.videos, args.out, models, settings, text_map=text_map,
                         whisper_model=args.whisper_model, progress=_progress_bar,
                         log=lambda line: print(f"\n{line}", file=sys.stderr))
    except (NarrateInputError, CheckpointError) as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    print(f"{len(result.accepted)} prepared, {len(result.reused)} already done, {len(result.skipped)} skipped "
          f"-> {args.out / 'manifest.jsonl'}")
    return 0
