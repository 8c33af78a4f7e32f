"""Video nodes: Load Hallo, Load wav2vec2, Face Encode, Speech Features, Video Diffusion Sampler, Batched VAE Decode."""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import io

from ..narrate_model import pipeline
from ..narrate_model.hallo.audio import load_wav2vec
from ..narrate_model.hallo.checkpoint import load_hallo
from ..narrate_model.hallo.sampler import SCHEDULER_NAMES, SamplerSettings
from .common import (AUDIO_FEATURES, CATEGORY, FACE, HALLO, WAV2VEC, checkpoint_choices, checkpoint_errors,
                     first_image, input_errors, licence_of, load_to_device, locate_checkpoint, patcher, progress_bar,
                     registry_help)

HALLO_DEFAULT = "net.pth"
WAV2VEC_DEFAULT = "wav2vec2-base-960h"
LANDMARKER_DEFAULT = "face_landmarker_v2_with_blendshapes.task"
IDENTITY_MODEL = "glintr100.onnx"
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelHandle:
    """What flows on NFY_HALLO / NFY_WAV2VEC sockets: the model under ComfyUI's memory management."""
    patcher: object
    name: str

    def model(self):
        return load_to_device(self.patcher)


def vae_callables(vae):
    """A ComfyUI VAE as the library's (encode, decode): pixels IMAGE [N,H,W,3] 0..1 <-> unscaled latents."""
    return (lambda pixels: vae.encode(pixels[..., :3]), lambda latents: _decode(vae, latents))


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    images = vae.decode(latents)
    return images.reshape(-1, *images.shape[-3:])  # some VAEs return [B, F, H, W, C]


def _compute_dtype(choice: str) -> torch.dtype | None:
    import comfy.model_management as mm

    if choice not in DTYPES:
        raise ValueError(f"Load Hallo: input 'dtype': {choice!r} is not one of {', '.join(DTYPES)}")
    if choice != "auto":
        return DTYPES[choice]
    return torch.float16 if mm.should_use_fp16() else torch.float32


class LoadHallo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_LoadHallo", display_name="Load Hallo", category=f"{CATEGORY}/loaders",
            description="Loads Hallo's net.pth (ReferenceNet, denoising 3D UNet with its motion modules, face "
                        "locator, image and audio projections) from ComfyUI/models/narrate/hallo/.",
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_choices("narrate_hallo", default=HALLO_DEFAULT),
                               tooltip="Hallo's net.pth (or a .safetensors copy) in models/narrate/hallo/."),
                io.Combo.Input("motion_module", options=["none"] + checkpoint_choices("narrate_motion_module"),
                               default="none",
                               tooltip="Only for a Net file without motion modules: AnimateDiff's "
                                       "mm_sd_v15_v2.ckpt. Hallo's net.pth already carries the trained ones."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: fp16 on GPUs that support it (as Hallo runs), fp32 on the CPU."),
            ],
            outputs=[HALLO.Output(display_name="hallo", tooltip="The video model.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint, motion_module) -> bool:
        return True  # the dropdown lists only files that exist; execute() explains an absent one

    @classmethod
    def execute(cls, checkpoint, motion_module="none", dtype="auto") -> io.NodeOutput:
        help_text = registry_help("hallo") if checkpoint == HALLO_DEFAULT else "Put the Net weights there."
        path = locate_checkpoint("Load Hallo", "checkpoint", "narrate_hallo", checkpoint, None, help_text)
        motion = None if motion_module == "none" else locate_checkpoint(
            "Load Hallo", "motion_module", "narrate_motion_module", motion_module, None,
            "Put AnimateDiff's mm_sd_v15_v2.ckpt there, or choose 'none' for Hallo's net.pth.")
        with checkpoint_errors("Load Hallo", "checkpoint"):
            net = load_hallo(path, motion, _compute_dtype(dtype))
        return io.NodeOutput(ModelHandle(patcher(net), checkpoint),
                             ui={"text": [f"{checkpoint}: " + licence_of("hallo/net.pth")]})


class LoadWav2Vec(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_LoadWav2Vec", display_name="Load wav2vec2", category=f"{CATEGORY}/loaders",
            description="Loads the wav2vec2 speech encoder Hallo listens with (facebook/wav2vec2-base-960h) from a "
                        "folder in ComfyUI/models/narrate/wav2vec2/.",
            inputs=[io.Combo.Input("model", options=checkpoint_choices("narrate_wav2vec2", "config.json",
                                                                       WAV2VEC_DEFAULT),
                                   tooltip="A transformers model folder (config.json, model.safetensors, "
                                           "preprocessor_config.json) under models/narrate/wav2vec2/.")],
            outputs=[WAV2VEC.Output(display_name="wav2vec", tooltip="The speech-feature encoder.")],
        )

    @classmethod
    def validate_inputs(cls, model) -> bool:
        return True  # the dropdown lists only files that exist; execute() explains an absent one

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        help_text = registry_help("wav2vec2-base-960h") if model == WAV2VEC_DEFAULT else \
            "Put a wav2vec2 transformers folder there."
        folder = locate_checkpoint("Load wav2vec2", "model", "narrate_wav2vec2", model, "config.json", help_text)
        with checkpoint_errors("Load wav2vec2", "model"):
            encoder = load_wav2vec(folder)
        return io.NodeOutput(ModelHandle(patcher(encoder), model),
                             ui={"text": [f"{model}: " + licence_of("wav2vec2-base-960h/model.safetensors")]})


class FaceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_FaceEncode", display_name="Face Encode", category=f"{CATEGORY}/video",
            description="Finds the face (MediaPipe, 478 landmarks), cuts Hallo's square portrait around it, builds "
                        "the face / lip / background masks and the face-locator input, encodes the reference latent "
                        "with the VAE and, when onnxruntime and glintr100.onnx are installed, the ArcFace identity.",
            inputs=[
                io.Image.Input("image", tooltip="The portrait: any size, RGB, RGBA or greyscale. With several "
                                                "faces the largest is animated."),
                io.Vae.Input("vae", tooltip="Hallo's VAE: sd-vae-ft-mse through core Load VAE."),
                io.Int.Input("size", default=512, min=64, max=1024, step=64,
                             tooltip="Video width and height in pixels. Hallo was trained at 512."),
                io.Combo.Input("landmarker", options=checkpoint_choices("narrate_face_analysis", None,
                                                                        LANDMARKER_DEFAULT),
                               default=LANDMARKER_DEFAULT,
                               tooltip="MediaPipe's face landmarker .task file in models/narrate/face_analysis/."),
            ],
            outputs=[
                FACE.Output(display_name="face", tooltip="Everything the sampler needs from the portrait."),
                io.Image.Output(display_name="portrait", tooltip="The square portrait that will be animated."),
                io.Mask.Output(display_name="face_mask", tooltip="Blurred face region (64x64), as Hallo weights it."),
                io.Mask.Output(display_name="lip_mask", tooltip="Blurred lip region (64x64)."),
                io.Mask.Output(display_name="background_mask", tooltip="Blurred background (64x64)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, landmarker=LANDMARKER_DEFAULT) -> bool:
        return True  # the dropdown lists only files that exist; execute() explains an absent one

    @classmethod
    def execute(cls, image, vae, size=512, landmarker=LANDMARKER_DEFAULT) -> io.NodeOutput:
        landmarker_path = locate_checkpoint("Face Encode", "landmarker", "narrate_face_analysis", landmarker, None,
                                            registry_help("face-landmarker"))
        identity = folder_paths.get_full_path("narrate_face_analysis", IDENTITY_MODEL)
        encode, _ = vae_callables(vae)
        batch_notes = []
        with input_errors("Face Encode"):
            face = pipeline.prepare_face(first_image("Face Encode", image, batch_notes), landmarker_path, encode,
                                         size, identity, progress_bar(2))
        portrait = face.image(size)
        masks = [torch.from_numpy(face.blurred[k]).float().div(255)[None] for k in ("face", "lip", "full")]
        notes = pipeline.face_notes(face) + batch_notes
        return io.NodeOutput(face, portrait, *masks, ui={"text": notes})


class SpeechFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_SpeechFeatures", display_name="Speech Features (wav2vec2)", category=f"{CATEGORY}/video",
            description="Turns speech into one wav2vec2 feature window per video frame (all hidden layers, "
                        "5 frames wide), as Hallo listens to it. The audio sets the frame count: "
                        "ceil(seconds x fps).",
            inputs=[
                io.Audio.Input("audio", tooltip="The speech to lip-sync: any sample rate, mono or stereo."),
                WAV2VEC.Input("wav2vec", tooltip="The wav2vec2 encoder from Load wav2vec2."),
                io.Float.Input("fps", default=25.0, min=1.0, max=60.0, step=0.001,
                               tooltip="Video frames per second (Hallo: 25)."),
            ],
            outputs=[AUDIO_FEATURES.Output(display_name="features", tooltip="Per-frame speech features.")],
        )

    @classmethod
    def execute(cls, audio, wav2vec, fps=25.0) -> io.NodeOutput:
        with input_errors("Speech Features"), torch.inference_mode():
            features = pipeline.listen(wav2vec.model(), audio, fps, progress=progress_bar(1))
        return io.NodeOutput(features, ui={"text": [f"{features.seconds:.2f} s of speech -> "
                                                    f"{features.num_frames} frames at {float(fps):g} fps"]})


class VideoDiffusionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = SamplerSettings()
        return io.Schema(
            node_id="NFY_VideoDiffusionSampler", display_name="Video Diffusion Sampler (Hallo)",
            category=f"{CATEGORY}/video",
            description="Animates the portrait to the speech features, 16-frame clips at a time with the last "
                        "frames of each clip carried into the next, so audio of any length works. Outputs the "
                        "latents of every frame for VAE Decode (or Batched VAE Decode / Stream to MP4).",
            inputs=[
                HALLO.Input("hallo", tooltip="The video model from Load Hallo."),
                FACE.Input("face", tooltip="The portrait from Face Encode (or the entangler)."),
                AUDIO_FEATURES.Input("features", tooltip="Per-frame speech features from Speech Features."),
                io.Vae.Input("vae", tooltip="The VAE Face Encode used: carries the last frames of each clip into "
                                            "the next through pixels, as Hallo does."),
                io.Int.Input("steps", default=d.steps, min=1, max=200, tooltip="Denoising steps (Hallo: 40)."),
                io.Float.Input("cfg", default=d.cfg, min=1.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance (Hallo: 3.5; 1 turns it off and halves the cost)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                io.Combo.Input("scheduler", options=list(SCHEDULER_NAMES), default="ddim",
                               tooltip="ddim = Hallo's (v-prediction, zero-SNR, trailing spacing); the others use "
                                       "the same betas."),
                io.Int.Input("clip_length", default=d.clip_length, min=4, max=32,
                             tooltip="Frames generated together (Hallo: 16)."),
                io.Int.Input("motion_frames", default=d.motion_frames, min=0, max=4,
                             tooltip="Frames carried from one clip into the next for continuous motion (Hallo: 2)."),
                io.Float.Input("pose_weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="How strongly the audio drives head pose (the full-face branch)."),
                io.Float.Input("face_weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="How strongly the audio drives facial expression."),
                io.Float.Input("lip_weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="How strongly the audio drives the lips."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="Latents of every frame (for VAE Decode).")],
        )

    @classmethod
    def execute(cls, hallo, face, features, vae, steps, cfg, seed, scheduler, clip_length, motion_frames,
                pose_weight, face_weight, lip_weight) -> io.NodeOutput:
        settings = SamplerSettings(steps=steps, cfg=cfg, seed=seed, clip_length=clip_length,
                                   motion_frames=motion_frames, scheduler=scheduler,
                                   motion_scale=(pose_weight, face_weight, lip_weight))
        encode, decode = vae_callables(vae)
        with input_errors("Video Diffusion Sampler"), torch.inference_mode():
            clips = pipeline.animate(hallo.model(), face, features, settings, encode, decode, progress_bar(1))
            latents = torch.cat(list(clips))
        return io.NodeOutput({"samples": latents})


class BatchedVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_BatchedVAEDecode", display_name="Batched VAE Decode", category=f"{CATEGORY}/video",
            description="VAE Decode for long videos: decodes a fixed number of frames at a time, so the decoder's "
                        "working memory stays the same however many frames there are.",
            inputs=[
                io.Latent.Input("samples", tooltip="Video latents, e.g. from the Video Diffusion Sampler."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Frames decoded at a time."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The decoded frames.")],
        )

    @classmethod
    def execute(cls, samples, vae, batch_size=8) -> io.NodeOutput:
        latents = samples["samples"]
        progress = progress_bar(latents.shape[0])
        frames = []
        for start in range(0, latents.shape[0], batch_size):
            frames.append(_decode(vae, latents[start:start + batch_size]).cpu())
            progress(min(start + batch_size, latents.shape[0]), latents.shape[0])
        return io.NodeOutput(torch.cat(frames))


NODES = [LoadHallo, LoadWav2Vec, FaceEncode, SpeechFeatures, VideoDiffusionSampler, BatchedVAEDecode]
