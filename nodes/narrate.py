"""The narration nodes: Load Entangler, Dual Entanglement Transformer, Stream to MP4, and the one-box Narrate."""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import InputImpl, io

from ..narrate_model import av, pipeline
from ..narrate_model.entangle import load_entangler
from ..narrate_model.hallo.sampler import SCHEDULER_NAMES, SamplerSettings
from ..narrate_model.xtts.sampling import SamplingParams
from ..narrate_model.xtts.text import SUPPORTED_LANGUAGES
from .common import (CATEGORY, ENTANGLER, FACE, HALLO, TOKENS, VOICE, WAV2VEC, XTTS, checkpoint_choices,
                     checkpoint_errors, compute_device, first_image, input_errors, licence_of, load_to_device,
                     load_together, locate_checkpoint, output_mp4, patcher, progress_bar, registry_help)
from .video import LANDMARKER_DEFAULT, IDENTITY_MODEL, vae_callables

UNTRAINED = {"untrained identity (ETE)": "ETE", "untrained identity (STE)": "STE"}


@dataclass
class EntanglerHandle:
    """A trained entangler file, or the mode of an identity-initialised one sized to the voice and face it meets.
    A trained one is read once (by its loader, or at its first use) and then kept under ComfyUI's memory management
    like the other models, so it runs on the compute device and is not read from disk again while the handle lives
    (ComfyUI caches the loader's output)."""
    path: str | None
    mode: str
    patcher: object | None = None

    def managed(self):
        if self.patcher is None and self.path is not None:
            self.patcher = patcher(load_entangler(self.path))
        return self.patcher

    def build(self, voice, face):
        """The entangler on the compute device."""
        if self.path is None:
            return pipeline.identity_entangler(voice, face, self.mode, device=compute_device())
        return load_to_device(self.managed())


def narration_models(xtts, hallo, wav2vec, entangler: EntanglerHandle | None):
    """The Narrate box's models on the compute device, loaded in one model-management call: (xtts, hallo,
    wav2vec, what NarrationModels.entangler takes: the trained model, an identity mode or None)."""
    trained = entangler is not None and entangler.path is not None
    patchers = [xtts.patcher, hallo.patcher, wav2vec.patcher] + ([entangler.managed()] if trained else [])
    xtts_model, hallo_model, wav2vec_model, *rest = load_together(patchers)
    if trained:
        return xtts_model, hallo_model, wav2vec_model, rest[0]
    return xtts_model, hallo_model, wav2vec_model, None if entangler is None else entangler.mode


def cascade_model_inputs() -> list:
    """The model sockets of the boxes that run the whole cascade (Narrate, Dialogue)."""
    return [XTTS.Input("xtts", tooltip="From Load XTTS-v2."),
            HALLO.Input("hallo", tooltip="From Load Hallo."),
            WAV2VEC.Input("wav2vec", tooltip="From Load wav2vec2."),
            io.Vae.Input("vae", tooltip="Hallo's VAE (sd-vae-ft-mse) from core Load VAE.")]


def video_sampler_inputs() -> list:
    """Those boxes' video sampler settings, at Hallo's defaults."""
    video = SamplerSettings()
    return [io.Int.Input("steps", default=video.steps, min=1, max=200, tooltip="Denoising steps (Hallo: 40)."),
            io.Float.Input("cfg", default=video.cfg, min=1.0, max=20.0, step=0.1,
                           tooltip="Classifier-free guidance of the video (Hallo: 3.5)."),
            io.Combo.Input("scheduler", options=list(SCHEDULER_NAMES), default="ddim",
                           tooltip="Video scheduler; ddim is Hallo's.")]


class LoadEntangler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_LoadEntangler", display_name="Load Entangler", category=f"{CATEGORY}/loaders",
            description="NFY's dual entanglement transformers. NFY publishes no trained weights: the untrained "
                        "options build the entangler at its identity initialisation (its output equals its input, "
                        "yet it trains), for fine-tuning or as a pass-through; trained files go in "
                        "models/narrate/entangle/.",
            inputs=[io.Combo.Input("entangler", options=list(UNTRAINED) + checkpoint_choices("narrate_entangle"),
                                   default=next(iter(UNTRAINED)),
                                   tooltip="A trained .safetensors entangler, or an untrained identity one: ETE = "
                                           "separate audio and video encoders (the paper's default), STE = one "
                                           "shared encoder.")],
            outputs=[ENTANGLER.Output(display_name="entangler", tooltip="The entanglement transformers.")],
        )

    @classmethod
    def execute(cls, entangler) -> io.NodeOutput:
        if entangler in UNTRAINED:
            return io.NodeOutput(EntanglerHandle(None, UNTRAINED[entangler]),
                                 ui={"text": [f"{entangler}: built by the pack, no weights file; under the "
                                                       "pack's own Apache-2.0 licence"]})
        path = locate_checkpoint("Load Entangler", "entangler", "narrate_entangle", entangler)
        with checkpoint_errors("Load Entangler", "entangler"):
            model = load_entangler(path)  # read once here: a bad file fails at the loader, and ComfyUI caches it
        return io.NodeOutput(EntanglerHandle(path, model.config.mode, patcher(model)),
                             ui={"text": [f"{entangler}: " + licence_of("entangle")]})


class Entangle(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_Entangle", display_name="Dual Entanglement Transformer", category=f"{CATEGORY}/narrate",
            description="NFY's entanglement: the voice conditioning attends to the text and the face, the face "
                        "conditioning to the text and the voice; both come out in the shapes XTTS and Hallo use.",
            inputs=[
                VOICE.Input("voice", tooltip="From Voice Profile Encode."),
                FACE.Input("face", tooltip="From Face Encode."),
                TOKENS.Input("tokens", tooltip="From Text BPE."),
                ENTANGLER.Input("entangler", tooltip="From Load Entangler."),
            ],
            outputs=[VOICE.Output(display_name="voice", tooltip="The entangled voice."),
                     FACE.Output(display_name="face", tooltip="The entangled face.")],
        )

    @classmethod
    def execute(cls, voice, face, tokens, entangler) -> io.NodeOutput:
        with input_errors("Dual Entanglement Transformer"), torch.inference_mode():
            return io.NodeOutput(*pipeline.entangle(entangler.build(voice, face), voice, face, tokens))


class StreamToMP4(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_StreamToMP4", display_name="Stream to MP4 (decode + mux)", category=f"{CATEGORY}/output",
            description="For long videos: decodes the latents a few frames at a time and encodes each batch straight "
                        "into the .mp4 with the audio, so memory does not grow with the video's length (a decoded "
                        "IMAGE batch of a 5-minute 512x512 video alone would take 23 GB).",
            inputs=[
                io.Latent.Input("samples", tooltip="Video latents from the Video Diffusion Sampler."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                io.Audio.Input("audio", tooltip="The soundtrack; padded or trimmed to the frames."),
                io.Float.Input("fps", default=25.0, min=1.0, max=240.0, step=0.001,
                               tooltip="Frames per second, kept as an exact fraction."),
                io.String.Input("filename_prefix", default="narrate/video",
                                tooltip="Where the .mp4 goes under ComfyUI's output folder."),
                io.Int.Input("batch_size", default=8, min=1, max=128, tooltip="Frames decoded at a time."),
            ],
            outputs=[io.Video.Output(tooltip="The saved video.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples, vae, audio, fps, filename_prefix, batch_size=8) -> io.NodeOutput:
        latents = samples["samples"]
        path, saved = output_mp4(filename_prefix, latents.shape[-1] * 8, latents.shape[-2] * 8)
        _, decode = vae_callables(vae)
        with input_errors("Stream to MP4"):
            av.stream_latents_to_mp4(path, latents, decode, fps, audio["waveform"][0], audio["sample_rate"],
                                     chunk=batch_size, progress=progress_bar(latents.shape[0]))
        return io.NodeOutput(InputImpl.VideoFromFile(path), ui={"images": [saved], "animated": (True,)})


class Narrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        speech = SamplingParams()
        return io.Schema(
            node_id="NFY_Narrate", display_name="Narrate (portrait + voice + text -> talking video)",
            category=f"{CATEGORY}/narrate",
            description="The whole narration in one box: clones the voice, speaks the text in sentence chunks, "
                        "animates the portrait to the speech and streams the .mp4 to disk (memory stays flat "
                        "however long the text).",
            inputs=[
                *cascade_model_inputs(),
                io.Image.Input("image", tooltip="The portrait to animate."),
                io.Audio.Input("voice", tooltip="A few seconds (3-30) of the person's voice."),
                io.String.Input("text", multiline=True, default="Hello! This is my voice, narrating for you.",
                                tooltip="What the portrait says. Long text is spoken in sentence chunks."),
                io.Combo.Input("language", options=list(SUPPORTED_LANGUAGES), default="en",
                               tooltip="Language of the text."),
                io.Float.Input("fps", default=25.0, min=1.0, max=60.0, step=0.001,
                               tooltip="Video frames per second (Hallo: 25)."),
                io.Int.Input("size", default=512, min=64, max=1024, step=64,
                             tooltip="Video width and height (Hallo: 512)."),
                *video_sampler_inputs(),
                io.Float.Input("temperature", default=speech.temperature, min=0.01, max=2.0, step=0.01,
                               tooltip="Speech sampling temperature."),
                io.Float.Input("speed", default=speech.speed, min=0.25, max=4.0, step=0.05,
                               tooltip="Speaking speed (1 = natural)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the speech sampler and the video noise."),
                io.Int.Input("max_codes", default=0, min=0, max=602,
                             tooltip="Upper bound of speech codes per sentence chunk (21.5 codes = 1 s); 0 = the "
                                     "model's own limit."),
                io.String.Input("filename_prefix", default="narrate/narration",
                                tooltip="Where the .mp4 goes under ComfyUI's output folder."),
                ENTANGLER.Input("entangler", optional=True,
                                tooltip="Optional NFY entangler (Load Entangler); without it voice and face are "
                                        "used as encoded."),
                io.Combo.Input("landmarker", options=checkpoint_choices("narrate_face_analysis", None,
                                                                        LANDMARKER_DEFAULT),
                               default=LANDMARKER_DEFAULT, optional=True,
                               tooltip="MediaPipe's face landmarker in models/narrate/face_analysis/."),
            ],
            outputs=[io.Video.Output(tooltip="The talking-face video with the cloned speech."),
                     io.Audio.Output(display_name="speech", tooltip="The cloned speech alone (24 kHz).")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, landmarker=LANDMARKER_DEFAULT) -> bool:
        return True  # the dropdown lists only files that exist; execute() explains an absent one

    @classmethod
    def execute(cls, xtts, hallo, wav2vec, vae, image, voice, text, language, fps, size, steps, cfg, scheduler,
                temperature, speed, seed, max_codes, filename_prefix, entangler=None,
                landmarker=LANDMARKER_DEFAULT) -> io.NodeOutput:
        landmarker_path = locate_checkpoint("Narrate", "landmarker", "narrate_face_analysis", landmarker, None,
                                            registry_help("face-landmarker"))
        encode, decode = vae_callables(vae)
        xtts_model, hallo_model, wav2vec_model, entangler_model = narration_models(xtts, hallo, wav2vec, entangler)
        models = pipeline.NarrationModels(
            xtts=xtts_model, tokenizer=xtts.tokenizer, hallo=hallo_model, wav2vec=wav2vec_model,
            vae_encode=encode, vae_decode=decode, landmarker=landmarker_path,
            identity_model=folder_paths.get_full_path("narrate_face_analysis", IDENTITY_MODEL),
            entangler=entangler_model)
        settings = pipeline.NarrationSettings(
            language=language, fps=av.exact_fps(fps), size=size,
            speech=SamplingParams(temperature=temperature, speed=speed, seed=seed, max_new_tokens=max_codes or None),
            video=SamplerSettings(steps=steps, cfg=cfg, seed=seed, scheduler=scheduler))
        path, saved = output_mp4(filename_prefix, size, size)
        clips = [(w, voice["sample_rate"]) for w in voice["waveform"]]
        notes = []
        with input_errors("Narrate"), torch.inference_mode():
            result = pipeline.narrate_to_mp4(models, first_image("Narrate", image, notes), clips, text, path,
                                             settings, progress_bar(1))
        summary = (f"{result.chunks} sentence chunk(s), {result.frames} frames at {float(result.fps):g} fps "
                   f"-> {saved['filename']}")
        return io.NodeOutput(InputImpl.VideoFromFile(path), result.audio,
                             ui={"images": [saved], "animated": (True,), "text": result.notes + notes + [summary]})


NODES = [LoadEntangler, Entangle, StreamToMP4, Narrate]
