"""Load an XTTS-v2 checkpoint (coqui `config.json` + `model.pth` or `model.safetensors`) into `XttsModel`.

The state dict is normalised the way upstream's loader does (trainer prefix `xtts.` stripped, DVAE and mel-extractor
entries dropped, the inference-time aliases `gpt.gpt_inference.*` / `gpt.gpt.wte.weight` ignored), old weight-norm
keys (`weight_g`/`weight_v`) are renamed to torch's parametrization layout, then every key and shape is checked
before the tensors are assigned to a model built on the meta device (no second copy in memory). Weight norm is folded
into plain weights afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

import torch

from ..errors import CheckpointError
from ..state_dict import key_mismatch, listing
from ..state_dict import read_state_dict as _read
from . import fast_decode
from .config import XttsConfig
from .model import XttsModel

MODELS_DIR_HINT = "ComfyUI/models/narrate/xtts/<name>/"
CHECKPOINT_NAMES = ("model.safetensors", "model.pth")
DROPPED_PREFIXES = ("dvae.", "torch_mel_spectrogram_style_encoder.", "torch_mel_spectrogram_dvae.",
                    "gpt.gpt_inference.")
DROPPED_KEYS = ("gpt.gpt.wte.weight",)  # alias of gpt.mel_embedding created by upstream's init_gpt_for_inference()
XTTS_SIGNATURE = ("gpt.conditioning_encoder.", "hifigan_decoder.waveform_decoder.")


def _where(folder: Path, name: str) -> str:
    return f"put {name} in {MODELS_DIR_HINT.replace('<name>', folder.name or '<name>')}"


def _resolve_files(folder_or_files) -> tuple[Path, Path, Path]:
    """-> (folder, config.json, checkpoint file)."""
    if isinstance(folder_or_files, (str, Path)):
        path = Path(folder_or_files)
        if path.is_dir() or not path.suffix:
            folder = path
            # coqui ships model.pth; a safetensors conversion next to it is preferred (no pickle, memory-mapped)
            ckpt = next((folder / n for n in CHECKPOINT_NAMES if (folder / n).is_file()), folder / "model.pth")
            config = folder / "config.json"
        else:
            folder, ckpt, config = path.parent, path, path.parent / "config.json"
    else:
        files = [Path(f) for f in folder_or_files]
        config = next((f for f in files if f.suffix == ".json"), None)
        ckpt = next((f for f in files if f.suffix in (".pth", ".safetensors", ".pt", ".bin")), None)
        if ckpt is None:
            raise CheckpointError(f"no XTTS-v2 checkpoint among {[str(f) for f in files]}: expected a model.pth or "
                                  f"model.safetensors (from coqui/XTTS-v2) in {MODELS_DIR_HINT}")
        folder = ckpt.parent
        config = config or folder / "config.json"
    for f in (config, ckpt):
        if not f.is_file():
            raise CheckpointError(f"XTTS-v2 file not found: {f}. Download {f.name} from the coqui/XTTS-v2 model "
                                  f"repository and {_where(folder, f.name)}")
    return folder, config, ckpt


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (narrate_model.state_dict reads both formats, weights-only)."""
    try:
        return _read(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; it is not a usable XTTS-v2 checkpoint") from exc


def normalize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream's compatibility edits plus the old weight-norm layout -> torch parametrizations."""
    out = {}
    for key, value in sd.items():
        if key.startswith("xtts."):  # checkpoints saved by the coqui GPT trainer
            key = key[len("xtts."):]
        if key.startswith(DROPPED_PREFIXES) or key in DROPPED_KEYS:
            continue
        if key.endswith(".weight_g"):
            key = key[:-len("weight_g")] + "parametrizations.weight.original0"
        elif key.endswith(".weight_v"):
            key = key[:-len("weight_v")] + "parametrizations.weight.original1"
        out[key] = value
    return out


def _unfold_plain_weights(sd: dict, expected: dict) -> None:
    """A state dict saved after folding weight norm has plain `X.weight` where we expect g/v: v = w, g = |w|."""
    for key in [k for k in expected if k.endswith(".parametrizations.weight.original1")]:
        base = key[:-len("parametrizations.weight.original1")]
        if key not in sd and base + "weight" in sd and base + "parametrizations.weight.original0" not in sd:
            w = sd.pop(base + "weight")
            sd[key] = w
            sd[base + "parametrizations.weight.original0"] = torch.linalg.vector_norm(
                w.float(), dim=tuple(range(1, w.dim())), keepdim=True).to(w.dtype)


def _top_prefixes(keys: Iterable[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] for k in keys})[:8])


def check_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise CheckpointError naming missing / unexpected / mis-shaped keys (a few of each, with counts)."""
    if not any(k.startswith(XTTS_SIGNATURE) for k in sd):
        raise CheckpointError(f"{source} is not an XTTS-v2 checkpoint: it has no gpt.conditioning_encoder.* or "
                              f"hifigan_decoder.* weights (its top-level entries: {_top_prefixes(sd) or 'none'}). "
                              f"Use model.pth from coqui/XTTS-v2 in {MODELS_DIR_HINT}")
    problems = key_mismatch({k: v.shape for k, v in model.state_dict().items()}, sd)
    if problems:
        raise CheckpointError(f"{source} does not match the XTTS-v2 model described by its config.json: {problems}")


def _vocab_overrides(folder: Path) -> dict:
    """Upstream derives the text vocabulary size and start/stop ids from vocab.json when it is present."""
    vocab_file = folder / "vocab.json"
    if not vocab_file.is_file():
        return {}
    data = json.loads(vocab_file.read_text(encoding="utf-8"))
    vocab = dict(data.get("model", {}).get("vocab", {}))
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    if not vocab:
        return {}
    out = {"gpt_number_text_tokens": max(vocab.values()) + 1}
    if "[START]" in vocab:
        out["gpt_start_text_token"] = vocab["[START]"]
    if "[STOP]" in vocab:
        out["gpt_stop_text_token"] = vocab["[STOP]"]
    return out


def load_xtts(folder_or_files: Union[str, Path, Iterable], device="cpu", dtype: torch.dtype = torch.float32,
              compile: bool = False, compile_backend: str = "inductor") -> tuple[XttsModel, XttsConfig]:
    """Load config.json + model.safetensors / model.pth (a folder, a checkpoint path, or a list of the two files).

    Returns the model in eval mode on `device` and its config. dtype: the precision of the GPT and the waveform
    decoder (`XttsModel.set_precision`; the voice encoders and mel front ends stay float32, int64 BN counters stay
    int64); float32 is the exact-parity path. compile: decode steps at fixed shapes through torch.compile
    (`compile_backend`) and, on CUDA, captured as CUDA graphs (fast_decode.py; compiled on first use per batch
    size, the time in `model.gpt.fast_decode.stats`).
    """
    folder, config_file, ckpt = _resolve_files(folder_or_files)
    try:
        cfg = XttsConfig.from_json(config_file)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not a valid XTTS config.json: {exc}") from exc
    if not cfg.gpt_use_perceiver_resampler:
        raise CheckpointError(f"{config_file} describes XTTS v1 (no perceiver resampler); only XTTS-v2 is supported")
    for name, value in _vocab_overrides(folder).items():
        setattr(cfg, name, value)

    sd = normalize_state_dict(read_state_dict(ckpt))
    model = XttsModel.from_config(cfg, device="meta")
    _unfold_plain_weights(sd, model.state_dict())
    check_state_dict(sd, model, str(ckpt))
    # fold weight norm in float32 before any down-cast
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.hifigan_decoder.fold_weight_norm()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:  # a tensor that is neither in the checkpoint nor computed at load: a bug in our model code
        raise RuntimeError(f"XTTS tensors left uninitialised after loading: {listing(leftovers)}")
    model = model.to(device=device)
    if dtype != torch.float32:
        model.set_precision(dtype)
    model.eval()
    if compile:
        fast_decode.enable(model.gpt, compile_backend)
    return model, cfg
