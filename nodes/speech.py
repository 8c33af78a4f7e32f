"""Speech nodes: Load XTTS, Text BPE, Voice Profile Encode, Spectrogram Synthesizer, Vocoder."""
from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..narrate_model.progress import checked
from ..narrate_model.xtts.speech import synthesize, vocode
from ..narrate_model.xtts.checkpoint import load_xtts
from ..narrate_model.xtts.model import PRECISIONS, check_precision
from ..narrate_model.xtts.sampling import SamplingParams
from ..narrate_model.xtts.text import SUPPORTED_LANGUAGES, XttsTokenizer, tokenize
from ..narrate_model.xtts.voice import encode_voice
from .common import (CATEGORY, SPEECH_LATENTS, TOKENS, VOICE, XTTS, checkpoint_choices, checkpoint_errors, input_errors,
                     load_to_device, licence_of, locate_checkpoint, patcher, progress_bar, registry_help)

XTTS_DEFAULT = "XTTS-v2"  # the folder the registry downloads coqui/XTTS-v2 into


@dataclass
class XttsHandle:
    """What flows on an NFY_XTTS socket: the model under ComfyUI's memory management, its config and tokenizer."""
    patcher: object
    config: object
    tokenizer: XttsTokenizer
    name: str

    def model(self):
        return load_to_device(self.patcher)


class LoadXTTS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_LoadXTTS", display_name="Load XTTS-v2", category=f"{CATEGORY}/loaders",
            description="Loads an XTTS-v2 checkpoint folder (config.json, model.pth or model.safetensors, vocab.json) "
                        "from ComfyUI/models/narrate/xtts/. The XTTS-v2 weights are under the Coqui Public Model "
                        "License: non-commercial use only, including the speech they produce.",
            inputs=[io.Combo.Input("checkpoint", options=checkpoint_choices("narrate_xtts", "config.json", XTTS_DEFAULT),
                                   tooltip="A folder under models/narrate/xtts/ holding config.json, model.pth "
                                           "(or model.safetensors) and vocab.json, e.g. XTTS-v2."),
                    io.Combo.Input("precision", options=list(PRECISIONS), default="fp32", optional=True,
                                   tooltip="fp32: exact (the reference's codes). bf16 / fp16: about half the memory "
                                           "and faster on a GPU, speech very close but not bit-identical; fp16 "
                                           "needs a CUDA GPU. The voice encoders stay fp32."),
                    io.Boolean.Input("compile", default=False, optional=True,
                                     tooltip="Compile the speech decoder with torch.compile (and replay it as a "
                                             "CUDA graph on NVIDIA GPUs): faster speech after a one-time compile "
                                             "(a minute or more) per batch size on first use; needs a C++ "
                                             "compiler on the CPU.")],
            outputs=[XTTS.Output(display_name="xtts", tooltip="The speech model for the other speech nodes.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint) -> bool:
        return True  # the dropdown lists only files that exist; execute() explains an absent one

    @classmethod
    def execute(cls, checkpoint, precision="fp32", compile=False) -> io.NodeOutput:
        if precision not in PRECISIONS:
            raise ValueError(f"Load XTTS-v2: input 'precision' is {precision!r}; choose one of {list(PRECISIONS)}")
        dtype = PRECISIONS[precision]
        with input_errors("Load XTTS-v2"):
            check_precision(dtype, mm.get_torch_device())
        help_text = registry_help("xtts-v2") if checkpoint == XTTS_DEFAULT else \
            "Put config.json, model.pth (or model.safetensors) and vocab.json of an XTTS-v2 checkpoint there."
        folder = locate_checkpoint("Load XTTS-v2", "checkpoint", "narrate_xtts", checkpoint, "config.json", help_text)
        with checkpoint_errors("Load XTTS-v2", "checkpoint"):
            model, config = load_xtts(folder, dtype=dtype, compile=compile)
            tokenizer = XttsTokenizer(os.path.join(folder, "vocab.json"))
        handle = XttsHandle(patcher(model), config, tokenizer, checkpoint)
        options = f" ({precision}{', compiled' if compile else ''})" if precision != "fp32" or compile else ""
        return io.NodeOutput(handle, ui={"text": [f"{checkpoint}{options}: " + licence_of("xtts-v2/model.pth")]})


class TextBPE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_TextBPE", display_name="Text BPE", category=f"{CATEGORY}/speech",
            description="Cleans the text as XTTS does (numbers, abbreviations and symbols spelled out per language), "
                        "splits it into sentence chunks under the language's limit and encodes them with the "
                        "checkpoint's BPE vocabulary.",
            inputs=[
                XTTS.Input("xtts", tooltip="The XTTS model whose vocab.json encodes the text."),
                io.String.Input("text", multiline=True, default="Hello! This is my voice, narrating for you.",
                                tooltip="What the portrait will say. Long text is split into sentence chunks."),
                io.Combo.Input("language", options=list(SUPPORTED_LANGUAGES), default="en",
                               tooltip="Language of the text: sets the number spelling and the chunk length limit."),
                io.Boolean.Input("split_sentences", default=True,
                                 tooltip="Split long text into sentence chunks under the language's character limit "
                                         "(XTTS speaks each chunk, the chunks are joined)."),
            ],
            outputs=[TOKENS.Output(display_name="tokens", tooltip="Cleaned text, sentence chunks and token ids.")],
        )

    @classmethod
    def execute(cls, xtts, text, language, split_sentences=True) -> io.NodeOutput:
        with input_errors("Text BPE"):
            tokens = tokenize(xtts.tokenizer, text, language, split=split_sentences)
        summary = f"{len(text)} characters, {len(tokens.chunks)} chunk(s), {sum(map(len, tokens.ids))} tokens"
        return io.NodeOutput(tokens, ui={"text": [summary] + tokens.warnings})


class VoiceProfileEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_VoiceProfileEncode", display_name="Voice Profile Encode", category=f"{CATEGORY}/speech",
            description="Encodes a few seconds of a person's voice into XTTS's conditioning latents (32 tokens) and "
                        "speaker embedding (512-d). Several clips are averaged. 6-30 s of clean speech works best.",
            inputs=[
                XTTS.Input("xtts", tooltip="The XTTS model whose encoders read the voice."),
                io.Audio.Input("voice", tooltip="The voice profile: any sample rate, mono or stereo; at least 1 s, "
                                                "3 s or more recommended. Each item of a batch counts as a clip."),
                io.Audio.Input("more_voice", optional=True,
                               tooltip="Optional further clips of the same voice; all clips are averaged."),
                io.Int.Input("max_seconds", default=30, min=1, max=300,
                             tooltip="Only the first seconds of each clip are used (XTTS uses 30)."),
                io.Int.Input("chunk_seconds", default=4, min=1, max=60,
                             tooltip="The clip is encoded in chunks of this length and the chunks averaged "
                                     "(XTTS's default: 4 s)."),
            ],
            outputs=[VOICE.Output(display_name="voice", tooltip="The voice: conditioning latents + speaker embedding.")],
        )

    @classmethod
    def execute(cls, xtts, voice, max_seconds=30, chunk_seconds=4, more_voice=None) -> io.NodeOutput:
        clips = [(w, audio["sample_rate"]) for audio in (voice, more_voice) if audio is not None
                 for w in audio["waveform"]]
        model = xtts.model()
        with input_errors("Voice Profile Encode"), torch.inference_mode(), checked(model, progress_bar(1)):
            profile = encode_voice(model, clips, length_s=max_seconds, chunk_s=chunk_seconds,
                                   max_ref_s=max_seconds)
        lines = [f"voice profile: {profile.seconds:.1f} s from {len(clips)} clip(s)"] + profile.warnings
        return io.NodeOutput(profile, ui={"text": lines})


class SpectrogramSynthesizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = SamplingParams()
        return io.Schema(
            node_id="NFY_SpectrogramSynthesizer", display_name="Spectrogram Synthesizer (XTTS GPT)",
            category=f"{CATEGORY}/speech",
            description="XTTS's GPT-2 writes the speech as audio codes, conditioned on the voice and the text, one "
                        "sentence chunk at a time.",
            inputs=[
                XTTS.Input("xtts", tooltip="The XTTS model."),
                TOKENS.Input("tokens", tooltip="The text from Text BPE."),
                VOICE.Input("voice", tooltip="The voice from Voice Profile Encode (or the entangler)."),
                io.Boolean.Input("do_sample", default=d.do_sample,
                                 tooltip="Sample the codes (varied, natural); off = greedy decoding (deterministic)."),
                io.Float.Input("temperature", default=d.temperature, min=0.01, max=2.0, step=0.01,
                               tooltip="Sampling temperature: lower is steadier, higher more expressive."),
                io.Float.Input("top_p", default=d.top_p, min=0.01, max=1.0, step=0.01,
                               tooltip="Nucleus sampling: keep the most likely codes up to this probability mass."),
                io.Int.Input("top_k", default=d.top_k, min=0, max=1026,
                             tooltip="Keep only the k most likely codes (0 = no limit)."),
                io.Float.Input("repetition_penalty", default=d.repetition_penalty, min=1.0, max=20.0, step=0.1,
                               tooltip="Discourages repeating codes (XTTS's default 10 avoids stutters)."),
                io.Float.Input("length_penalty", default=d.length_penalty, min=-10.0, max=10.0, step=0.1,
                               tooltip="XTTS's length penalty (has no effect with one beam, as upstream)."),
                io.Float.Input("speed", default=d.speed, min=0.25, max=4.0, step=0.05,
                               tooltip="Speaking speed: 1 is natural, 1.2 is 20% faster."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the sampler; the same seed gives the same speech."),
                io.Int.Input("max_codes", default=0, min=0, max=602,
                             tooltip="Upper bound of audio codes per sentence chunk (21.5 codes = 1 s); 0 = the "
                                     "model's own limit (602, about 28 s)."),
            ],
            outputs=[SPEECH_LATENTS.Output(display_name="speech",
                                           tooltip="The generated codes and the GPT latents the vocoder turns into "
                                                   "sound.")],
        )

    @classmethod
    def execute(cls, xtts, tokens, voice, do_sample, temperature, top_p, top_k, repetition_penalty,
                length_penalty, speed, seed, max_codes=0) -> io.NodeOutput:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                                do_sample=do_sample, seed=seed, speed=speed, max_new_tokens=max_codes or None)
        model = xtts.model()
        with input_errors("Spectrogram Synthesizer"), torch.inference_mode():
            result = synthesize(model, tokens, voice, params, progress=progress_bar(len(tokens.ids)))
        counts = [{"codes": c.codes.shape[1], "latents": c.latents.shape[1]} for c in result.chunks]
        summary = f"{result.num_codes} codes in {len(counts)} chunk(s), about {result.seconds:.1f} s of speech"
        fast = model.gpt.fast_decode
        compiled = [f"{what}: {seconds:.1f}" for what, seconds in fast.stats.items()] if fast else []
        lines = [summary] + ([f"compile (once per batch size): {', '.join(compiled)}"] if compiled else [])
        return io.NodeOutput(result, ui={"text": lines, "nfy_chunks": counts})


class Vocoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_Vocoder", display_name="Vocoder (XTTS HiFi-GAN)", category=f"{CATEGORY}/speech",
            description="XTTS's HiFi-GAN turns the GPT latents into 24 kHz speech in the profile's voice.",
            inputs=[
                XTTS.Input("xtts", tooltip="The XTTS model."),
                SPEECH_LATENTS.Input("speech", tooltip="The output of the Spectrogram Synthesizer."),
                VOICE.Input("voice", tooltip="The voice whose speaker embedding colours the sound."),
            ],
            outputs=[io.Audio.Output(display_name="audio", tooltip="24 kHz mono speech (AUDIO).")],
        )

    @classmethod
    def execute(cls, xtts, speech, voice) -> io.NodeOutput:
        with input_errors("Vocoder"), torch.inference_mode():
            audio = vocode(xtts.model(), speech, voice, progress=progress_bar(len(speech.chunks)))
        return io.NodeOutput(audio)


NODES = [LoadXTTS, TextBPE, VoiceProfileEncode, SpectrogramSynthesizer, Vocoder]
