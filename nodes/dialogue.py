"""Dialogue nodes: Speaker (a person's face and voice, encoded once) and Dialogue (a script spoken by up to six
speakers, in one video)."""
from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import InputImpl, io

from ..narrate_model import av
from ..narrate_model.dialogue import compose
from ..narrate_model.dialogue.run import DialogueModels, DialogueSettings, dialogue_to_mp4, encode_speaker
from ..narrate_model.dialogue.script import MAX_SPEAKERS
from ..narrate_model.hallo.sampler import SamplerSettings
from ..narrate_model.progress import checked
from ..narrate_model.xtts.sampling import SamplingParams
from ..narrate_model.xtts.text import SUPPORTED_LANGUAGES
from .common import (CATEGORY, XTTS, checkpoint_choices, first_image, input_errors,
                     load_together, locate_checkpoint, output_mp4, progress_bar, registry_help)
from .narrate import cascade_model_inputs, video_sampler_inputs
from .video import IDENTITY_MODEL, LANDMARKER_DEFAULT, vae_callables

SPEAKER = io.Custom("NFY_SPEAKER")
EXAMPLE_SCRIPT = ("ALICE: Welcome back! Today we explain how a portrait learns to speak.\n"
                  "BOB: It starts with a few seconds of someone's voice.\n"
                  "ALICE: And one photo of their face.\n"
                  "[pause 0.5]\n"
                  "BOB: The rest is done for you.")


class Speaker(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_Speaker", display_name="Speaker", category=f"{CATEGORY}/dialogue",
            description="One person of a dialogue: the name the script uses, the portrait and the voice. The face "
                        "and voice are encoded here with Face Encode's and Voice Profile Encode's own functions, "
                        "once: changing the script re-uses them from ComfyUI's cache.",
            inputs=[
                io.String.Input("name", default="ALICE",
                                tooltip="The name the script writes before the colon ('ALICE: Hello'); upper and "
                                        "lower case match."),
                io.Image.Input("image", tooltip="The speaker's portrait (the first image of a batch)."),
                io.Audio.Input("voice", tooltip="A few seconds (3-30) of the speaker's voice."),
                XTTS.Input("xtts", tooltip="From Load XTTS-v2: encodes the voice."),
                io.Combo.Input("language", options=list(SUPPORTED_LANGUAGES), default="en",
                               tooltip="The language this speaker's lines are written in."),
                io.Float.Input("speed", default=1.0, min=0.25, max=4.0, step=0.05, optional=True,
                               tooltip="This speaker's speaking speed (1 = natural)."),
                io.Combo.Input("landmarker", options=checkpoint_choices("narrate_face_analysis", None,
                                                                        LANDMARKER_DEFAULT),
                               default=LANDMARKER_DEFAULT, optional=True,
                               tooltip="MediaPipe's face landmarker in models/narrate/face_analysis/."),
            ],
            outputs=[SPEAKER.Output(display_name="speaker", tooltip="The speaker, for a Dialogue node.")],
        )

    @classmethod
    def validate_inputs(cls, landmarker=LANDMARKER_DEFAULT) -> bool:
        return True  # the dropdown lists only files that exist; execute() explains an absent one

    @classmethod
    def execute(cls, name, image, voice, xtts, language, speed=1.0, landmarker=LANDMARKER_DEFAULT) -> io.NodeOutput:
        node = f"Speaker {name.strip()!r}"
        landmarker_path = locate_checkpoint(node, "landmarker", "narrate_face_analysis", landmarker, None,
                                            registry_help("face-landmarker"))
        notes = []
        clips = [(w, voice["sample_rate"]) for w in voice["waveform"]]
        model = xtts.model()
        with input_errors(node), torch.inference_mode(), checked(model, progress_bar(1)):
            speaker = encode_speaker(model, name, first_image(node, image, notes), clips, landmarker_path,
                                     folder_paths.get_full_path("narrate_face_analysis", IDENTITY_MODEL), language,
                                     speed)
        return io.NodeOutput(speaker, ui={"text": speaker.notes + notes})


def _srt_path(mp4: str) -> str:
    return os.path.splitext(mp4)[0] + ".srt"


class Dialogue(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        speech = SamplingParams()
        return io.Schema(
            node_id="NFY_Dialogue", display_name="Dialogue (script + speakers -> one video)",
            category=f"{CATEGORY}/dialogue",
            description="Speaks a script of several people, each line in its speaker's voice and face, in one "
                        "video with subtitles. The video is streamed to disk clip by clip, so memory does not grow "
                        "with the number of turns. Compute grows with the speakers visible: 'cut' generates only "
                        "the active speaker, side_by_side and grid generate every speaker all the time.",
            inputs=[
                *cascade_model_inputs(),
                io.String.Input("script", multiline=True, default=EXAMPLE_SCRIPT,
                                tooltip="One turn per line, 'NAME: text'. Blank lines are ignored, '[pause 1.5]' "
                                        "inserts 1.5 s of silence, a line without a name continues the speaker "
                                        "above."),
                *[SPEAKER.Input(f"speaker_{i}", optional=i > 1,
                                tooltip=f"Speaker {i} (a Speaker node)" + ("." if i == 1 else "; optional."))
                  for i in range(1, MAX_SPEAKERS + 1)],
                io.Combo.Input("layout", options=list(compose.LAYOUTS), default="side_by_side",
                               tooltip="cut: the active speaker full frame, cutting at each turn (generates only "
                                       "that speaker: the cheapest). side_by_side: every face in a row; grid: in "
                                       "rows. In both, listeners move with idle head motion and a thin border "
                                       "marks who speaks; compute grows with the number of speakers."),
                io.Float.Input("gap", default=0.3, min=0.0, max=10.0, step=0.05,
                               tooltip="Seconds of silence between two turns."),
                io.Float.Input("fps", default=25.0, min=1.0, max=60.0, step=0.001,
                               tooltip="Video frames per second (Hallo: 25)."),
                io.Int.Input("size", default=512, min=64, max=1024, step=64,
                             tooltip="Each speaker's square panel in pixels (Hallo: 512); side_by_side is that "
                                     "many pixels high and one panel wide per speaker."),
                *video_sampler_inputs(),
                io.Float.Input("temperature", default=speech.temperature, min=0.01, max=2.0, step=0.01,
                               tooltip="Speech sampling temperature."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the speech sampler (turn n uses seed + n) and of every speaker's "
                                     "video noise."),
                io.Int.Input("max_codes", default=0, min=0, max=602,
                             tooltip="Upper bound of speech codes per sentence chunk (21.5 codes = 1 s); 0 = the "
                                     "model's own limit."),
                io.String.Input("filename_prefix", default="narrate/dialogue",
                                tooltip="Where the .mp4 (and its .srt) go under ComfyUI's output folder."),
            ],
            outputs=[io.Video.Output(tooltip="The dialogue video with its sound track."),
                     io.Audio.Output(display_name="audio", tooltip="The whole sound track (24 kHz)."),
                     io.String.Output(display_name="srt",
                                      tooltip="SubRip subtitles: one cue per turn, 'NAME: text', timed by the "
                                              "speech."),
                     *[io.Audio.Output(display_name=f"stem_{i}",
                                       tooltip=f"Speaker {i}'s turns alone, silence elsewhere (for your own mix).")
                       for i in range(1, MAX_SPEAKERS + 1)]],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, xtts, hallo, wav2vec, vae, script, layout, gap, fps, size, steps, cfg, scheduler, temperature,
                seed, max_codes, filename_prefix, **speaker_inputs) -> io.NodeOutput:
        slots = [f"speaker_{i}" for i in range(1, MAX_SPEAKERS + 1)]
        connected = [slot for slot in slots if speaker_inputs.get(slot) is not None]
        speakers = [speaker_inputs[slot] for slot in connected]
        encode, decode = vae_callables(vae)
        xtts_model, hallo_model, wav2vec_model = load_together([xtts.patcher, hallo.patcher, wav2vec.patcher])
        models = DialogueModels(xtts=xtts_model, tokenizer=xtts.tokenizer, hallo=hallo_model,
                                wav2vec=wav2vec_model, vae_encode=encode, vae_decode=decode,
                                vae_module=getattr(vae, "first_stage_model", None))
        settings = DialogueSettings(
            layout=layout, gap=gap, fps=av.exact_fps(fps), size=size,
            speech=SamplingParams(temperature=temperature, seed=seed, max_new_tokens=max_codes or None),
            video=SamplerSettings(steps=steps, cfg=cfg, seed=seed, scheduler=scheduler))
        known = layout in compose.LAYOUTS  # an unknown one fails in the library, naming the input
        height, width = compose.canvas_size(layout, max(1, len(speakers)), size) if known else (size, size)
        path, saved = output_mp4(filename_prefix, width, height)
        with input_errors("Dialogue"), torch.inference_mode():
            result = dialogue_to_mp4(models, speakers, script, path, settings, progress_bar(1))
        with open(_srt_path(path), "x", encoding="utf-8") as f:  # "x": never over an existing file
            f.write(result.srt)
        silence = {"waveform": torch.zeros_like(result.audio["waveform"]),
                   "sample_rate": result.audio["sample_rate"]}
        stems = [result.stems[connected.index(slot)] if slot in connected else silence for slot in slots]
        summary = (f"{len(result.timeline.turns)} turn(s) by {len(speakers)} speaker(s), {result.frames} frames at "
                   f"{float(result.fps):g} fps -> {saved['filename']}")
        srt_item = dict(saved, filename=os.path.basename(_srt_path(path)))
        return io.NodeOutput(InputImpl.VideoFromFile(path), result.audio, result.srt, *stems,
                             ui={"images": [saved], "animated": (True,), "text": result.notes + [summary],
                                 "nfy_srt": [srt_item]})


NODES = [Speaker, Dialogue]
