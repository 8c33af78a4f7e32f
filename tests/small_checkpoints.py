"""Small checkpoints in the real file layouts, written where ComfyUI looks for them (`<models>/narrate/...`,
`<models>/vae/`). The weights are the upstream fixtures' reduced models (same key names as the real files), so
graphs that run on them exercise exactly the loading and compute paths the real checkpoints take."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, recorded_path

XTTS, HALLO = FIXTURES / "xtts", FIXTURES / "hallo"
LANDMARKER_NAME = "face_landmarker_v2_with_blendshapes.task"


@dataclasses.dataclass
class TrainerConfig:
    """Stands for the Coqpit config object coqui pickles next to the weights in the real model.pth."""
    model_args: dict


def write_xtts(models: Path, name: str = "small-test") -> str:
    """config.json + model.pth ({"model": xtts.* weights, "config": <pickled object>}, as coqui's trainer saves)
    + vocab.json."""
    folder = models / "narrate" / "xtts" / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(XTTS / "small_config.json", folder / "config.json")
    shutil.copy(XTTS / "bpe_vocab.json", folder / "vocab.json")
    weights = {f"xtts.{k}": v for k, v in load_file(XTTS / "small_model.safetensors").items()}
    config = TrainerConfig(json.loads((XTTS / "small_config.json").read_text()))
    torch.save({"model": weights, "config": config}, folder / "model.pth")
    return name


def write_wav2vec_folder(folder: Path, weights=None, **config_changes) -> Path:
    """The tiny wav2vec2 as a transformers folder in wav2vec2-base-960h layout (config, weights, extractor)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((HALLO / "tiny_wav2vec2_config.json").read_text())
    extractor = config.pop("_feature_extractor")
    config = {k: v for k, v in config.items() if not k.startswith("_")} | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(extractor))
    if weights is None:
        shutil.copy(HALLO / "tiny_wav2vec2.safetensors", folder / "model.safetensors")
    else:
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def write_wav2vec(models: Path, name: str = "tiny-test") -> str:
    write_wav2vec_folder(models / "narrate" / "wav2vec2" / name)
    return name


def write_hallo(models: Path, name: str = "tiny-test") -> str:
    """The reduced Net as safetensors, with its layout in `<name>.json` next to it."""
    folder = models / "narrate" / "hallo"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HALLO / "tiny_net.safetensors", folder / f"{name}.safetensors")
    shutil.copy(HALLO / "tiny_config.json", folder / f"{name}.json")
    return f"{name}.safetensors"


def write_landmarker(models: Path) -> str:
    folder = models / "narrate" / "face_analysis"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(recorded_path("NFY_FACE_LANDMARKER"), folder / LANDMARKER_NAME)
    return LANDMARKER_NAME


def write_sd_vae(models: Path, name: str = "test-sd-vae.safetensors") -> str:
    """A randomly initialised VAE with sd-vae-ft-mse's architecture and diffusers key names (what core Load VAE
    reads for SD1.x): core VAE loading infers nothing from sizes, so the test VAE must have the real shape."""
    from diffusers import AutoencoderKL

    path = models / "vae" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, sample_size=512)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return name


def small_narration_models(entangler=None):
    """The whole narration's models, small: the fixtures' reduced XTTS, Hallo Net, wav2vec2 and VAE (in memory)."""
    import tempfile

    from diffusers import AutoencoderKL

    from narrate_model.hallo.audio import load_wav2vec
    from narrate_model.hallo.checkpoint import load_hallo
    from narrate_model.hallo.sampler import diffusers_vae_callables
    from narrate_model.pipeline import NarrationModels
    from narrate_model.xtts.checkpoint import load_xtts
    from narrate_model.xtts.text import XttsTokenizer

    xtts, _ = load_xtts([XTTS / "small_config.json", XTTS / "small_model.safetensors"])
    folder = Path(tempfile.mkdtemp(prefix="nfy-models-"))
    shutil.copy(HALLO / "tiny_net.safetensors", folder / "net.safetensors")
    shutil.copy(HALLO / "tiny_config.json", folder / "net.json")
    vae = AutoencoderKL(**json.loads((HALLO / "tiny_config.json").read_text())["tiny_vae"]["config"])
    vae.load_state_dict(load_file(str(HALLO / "tiny_vae.safetensors")))
    encode, decode = diffusers_vae_callables(vae.eval())
    return NarrationModels(
        xtts=xtts, tokenizer=XttsTokenizer(XTTS / "bpe_vocab.json"), hallo=load_hallo(folder / "net.safetensors"),
        wav2vec=load_wav2vec(write_wav2vec_folder(folder / "wav2vec2")), vae_encode=encode, vae_decode=decode,
        landmarker=recorded_path("NFY_FACE_LANDMARKER"), entangler=entangler)
