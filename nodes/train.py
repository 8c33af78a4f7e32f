"""The training node: Personalize (fine-tune the entangler on one person's video, ready for the Narrate graph)."""
from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..narrate_model.entangle import load_entangler
from ..narrate_model.train import personalize as lib
from ..narrate_model.train.config import TrainConfig
from ..narrate_model.train.data import PrepareModels, PrepareSettings, Skip
from ..narrate_model.weights import sha256_file
from ..narrate_model.xtts.dvae import load_dvae, load_mel_stats
from ..narrate_model.xtts.text import SUPPORTED_LANGUAGES
from .common import (CATEGORY, ENTANGLER, HALLO, WAV2VEC, XTTS, checkpoint_choices, checkpoint_errors, input_errors,
                     locate_checkpoint, model_folder, patcher, registry_help)
from .narrate import EntanglerHandle
from .video import IDENTITY_MODEL, LANDMARKER_DEFAULT, vae_callables

NODE = "Personalize"
MAX_STEPS = 5000


def _vae_moments(vae):
    """ComfyUI's VAE encodes to the posterior mean: the sample's latents are that mean with zero spread (Hallo's
    stage 2 draws from the posterior; the mean is its most likely draw)."""
    encode, _ = vae_callables(vae)

    def moments(pixels):
        mean = encode(pixels).float()
        return mean, torch.zeros_like(mean)
    return moments


def _prepare_models(xtts, wav2vec, vae, landmarker: str) -> PrepareModels:
    folder = locate_checkpoint(NODE, "xtts", "narrate_xtts", xtts.name, "config.json")
    dvae_path, stats_path = os.path.join(folder, "dvae.pth"), os.path.join(folder, "mel_stats.pth")
    if not os.path.isfile(dvae_path):
        raise ValueError(f"{NODE}: input 'xtts': training needs XTTS-v2's dvae.pth next to the model, at {dvae_path}."
                         f"\n\n{registry_help('xtts-v2-training')}".strip())
    model = xtts.model()
    with checkpoint_errors(NODE, "xtts"):
        dvae = load_dvae(dvae_path, model.mel_stats.device)
        norms = load_mel_stats(stats_path) if os.path.isfile(stats_path) else model.mel_stats.detach().cpu()
    return PrepareModels(xtts=model, tokenizer=xtts.tokenizer, dvae=dvae, mel_norms=norms,
                         vae_moments=_vae_moments(vae), wav2vec=wav2vec.model(), landmarker=landmarker,
                         checkpoints={"xtts": {"file": xtts.name, "sha256": sha256_file(
                             os.path.join(folder, "model.safetensors") if os.path.isfile(
                                 os.path.join(folder, "model.safetensors")) else os.path.join(folder, "model.pth"))},
                                      "dvae": {"file": "dvae.pth", "sha256": sha256_file(dvae_path)}},
                         identity_model=folder_paths.get_full_path("narrate_face_analysis", IDENTITY_MODEL))


class Personalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_Personalize", display_name="Personalize (fine-tune the entangler on one person)",
            category=f"{CATEGORY}/train",
            description="NFY's fine-tuning on one person: the video's first face is the portrait, its last seconds "
                        "the voice profile, the rest the target speech and frames (the text is its transcript). The "
                        "entanglement transformers train, XTTS and Hallo stay frozen; the result is saved as "
                        "models/narrate/entangle/<name>.safetensors (never overwritten) with a model card, and "
                        "flows on for Narrate. Cancel stops within a second (the step under way is dropped) and keeps "
                        "what trained so far.",
            inputs=[
                io.Image.Input("images", tooltip="The person's video as frames (e.g. from Load Video): a face in "
                                                 "the first frames, speaking throughout."),
                io.Audio.Input("audio", tooltip="The video's soundtrack: the person speaking the text."),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=0.001,
                               tooltip="Frame rate of the frames (the video loader's); resampled to Hallo's 25."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="What the person says in the video before its last voice_seconds (the "
                                        "transcript; the speech target is read with it)."),
                XTTS.Input("xtts", tooltip="From Load XTTS-v2 (its folder must also hold XTTS-v2's dvae.pth)."),
                HALLO.Input("hallo", tooltip="From Load Hallo."),
                WAV2VEC.Input("wav2vec", tooltip="From Load wav2vec2."),
                io.Vae.Input("vae", tooltip="Hallo's VAE (sd-vae-ft-mse) from core Load VAE."),
                io.Combo.Input("language", options=list(SUPPORTED_LANGUAGES), default="en",
                               tooltip="Language of the speech."),
                io.Int.Input("steps", default=200, min=1, max=MAX_STEPS,
                             tooltip=f"Optimiser steps (1-{MAX_STEPS}); each is one pass over the clip."),
                io.Float.Input("lr", default=1e-4, min=1e-7, max=1e-1, step=1e-6,
                               tooltip="AdamW learning rate (NFY: 1e-4)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of every random draw of the training (noise, timesteps, frames)."),
                io.String.Input("name", default="personal",
                                tooltip="File name of the result in models/narrate/entangle/ (a free one is "
                                        "picked if taken: name_2, ...)."),
                io.Int.Input("size", default=512, min=64, max=1024, step=64,
                             tooltip="Training resolution of the frames (Hallo: 512)."),
                io.Float.Input("voice_seconds", default=2.0, min=0.5, max=30.0, step=0.1,
                               tooltip="Length of the voice-profile segment taken from the video's end (paper: "
                                       "2 s; 3-6 s clones better)."),
                ENTANGLER.Input("entangler", optional=True,
                                tooltip="Start from this entangler (Load Entangler); default: an untrained ETE."),
                io.Combo.Input("landmarker", options=checkpoint_choices("narrate_face_analysis", None,
                                                                        LANDMARKER_DEFAULT),
                               default=LANDMARKER_DEFAULT, optional=True,
                               tooltip="MediaPipe's face landmarker in models/narrate/face_analysis/."),
            ],
            outputs=[ENTANGLER.Output(display_name="entangler", tooltip="The personalised entangler, for Narrate "
                                                                        "or Dual Entanglement Transformer.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, audio, fps, text, xtts, hallo, wav2vec, vae, language, steps, lr, seed, name, size,
                voice_seconds, entangler=None, landmarker=LANDMARKER_DEFAULT) -> io.NodeOutput:
        if not text.strip():
            raise ValueError(f"{NODE}: input 'text': give the transcript of what the person says in the video")
        if images.shape[0] < 2:
            raise ValueError(f"{NODE}: input 'images': give the video's frames (got {images.shape[0]} image)")
        landmarker_path = locate_checkpoint(NODE, "landmarker", "narrate_face_analysis", landmarker, None,
                                            registry_help("face-landmarker"))
        models = _prepare_models(xtts, wav2vec, vae, landmarker_path)
        # no gradient clipping: one clip has no outlier batches to guard against, and on the overfit test
        # (tests/test_train_nfy.py) the unclipped run went further at the same seed
        config = TrainConfig(lr=lr, batch_size=1, max_steps=steps, val_every=0, save_every=max(steps // 4, 1),
                             seed=seed, max_grad_norm=None, loss_weights=lib.loss_weights())
        run_dir = os.path.join(folder_paths.get_output_directory(), "narrate", "personalize",
                               lib.next_free(os.path.join(folder_paths.get_output_directory(), "narrate",
                                                          "personalize"), name, "").name)
        bar = comfy.utils.ProgressBar(steps)

        def progress(done: int, total: int) -> None:
            # ComfyUI's progress hook raises on Cancel; once cancelled, leave the stop to should_stop so the loop
            # saves the step reached and writes the entangler
            if not mm.processing_interrupted():
                bar.update_absolute(done, total)

        start = None if entangler is None else (entangler.path or entangler.mode)
        clip = lib.frames_to_clip(images, fps, audio["waveform"][0], audio["sample_rate"])
        try:
            with input_errors(NODE), torch.inference_mode(False), torch.enable_grad():
                net = hallo.model()
                done = lib.personalize(models, net, clip, text, model_folder("narrate_entangle"), name,
                                       run_dir, PrepareSettings(size=size, voice_seconds=voice_seconds,
                                                                language=language), config, start,
                                       progress=progress,
                                       should_stop=mm.processing_interrupted)
        except Skip as skip:
            raise ValueError(f"{NODE}: input 'images'/'audio': the video cannot be trained on ({skip})") from skip
        finally:
            os.unlink(clip)
        mm.throw_exception_if_processing_interrupted()  # cancelled: the weights so far are saved; the graph stops
        losses = ", ".join(f"{k} {v:.4g}" for k, v in done.result.train_losses.items())
        summary = f"{done.result.steps} steps ({losses}) -> {done.entangler.name}"
        trained = load_entangler(str(done.entangler))
        return io.NodeOutput(EntanglerHandle(str(done.entangler), trained.config.mode, patcher(trained)),
                             ui={"text": [summary]})


NODES = [Personalize]
