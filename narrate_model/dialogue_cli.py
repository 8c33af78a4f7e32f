"""`python -m narrate_model dialogue`: a script spoken by several speakers (each a portrait and a voice) into one
.mp4 and its .srt, through a ComfyUI server (a running one, or one started headless for the job), with the shipped
dialogue workflow's loaders and settings."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from .client import ComfyClient, ExecutionFailed
from .dialogue.script import MAX_SPEAKERS
from .narrate_cli import WORKFLOWS, connect, prepare, require_pack, with_sets

TEMPLATE = "dialogue"
LOADERS = ("3", "4", "5", "6")  # the template's Load XTTS-v2, Load VAE, Load Hallo, Load wav2vec2
SPEAKER, DIALOGUE = "9", "11"  # the template's first Speaker node (the pattern for all) and its Dialogue node


def parse_speaker(text: str) -> tuple[str, Path, Path, dict]:
    """NAME=portrait,voice[,language[,speed]] -> (name, portrait, voice, the Speaker node's other inputs)."""
    name, sep, rest = text.partition("=")
    parts = [p.strip() for p in rest.split(",")]
    if not sep or not name.strip() or not 2 <= len(parts) <= 4:
        raise SystemExit(f"--speaker {text!r}: expected NAME=portrait.png,voice.wav[,language[,speed]]")
    extra = {}
    if len(parts) > 2:
        extra["language"] = parts[2]
    if len(parts) > 3:
        try:
            extra["speed"] = float(parts[3])
        except ValueError:
            raise SystemExit(f"--speaker {text!r}: the speed {parts[3]!r} is not a number") from None
    for path in map(Path, parts[:2]):
        if not path.is_file():
            raise SystemExit(f"--speaker {text!r}: no file {path}")
    return name.strip(), Path(parts[0]), Path(parts[1]), extra


def dialogue_prompt(template: dict, speakers: list[tuple[str, str, str, dict]], script: str) -> dict:
    """The template's loaders and Dialogue node with one LoadImage + LoadAudio + Speaker per speaker
    ((name, uploaded image, uploaded voice, other Speaker inputs)), speaker_1.. in the order given."""
    if not 1 <= len(speakers) <= MAX_SPEAKERS:
        raise SystemExit(f"{len(speakers)} speakers given; a dialogue has 1 to {MAX_SPEAKERS}")
    names = [name.casefold() for name, *_ in speakers]
    if len(set(names)) != len(names):
        raise SystemExit(f"two --speaker options have the same name: {', '.join(n for n, *_ in speakers)}")
    prompt = {k: copy.deepcopy(template[k]) for k in (*LOADERS, DIALOGUE)}
    dialogue = prompt[DIALOGUE]["inputs"]
    for key in [k for k in dialogue if k.startswith("speaker_")]:
        del dialogue[key]
    dialogue["script"] = script
    for i, (name, image, voice, extra) in enumerate(speakers, start=1):
        image_id, voice_id, speaker_id = (str(100 + 10 * i + k) for k in range(3))
        prompt[image_id] = {"class_type": "LoadImage", "inputs": {"image": image}}
        prompt[voice_id] = {"class_type": "LoadAudio", "inputs": {"audio": voice}}
        node = copy.deepcopy(template[SPEAKER])
        node["inputs"].update(name=name, image=[image_id, 0], voice=[voice_id, 0], **extra)
        node["_meta"] = {"title": f"Speaker {name}"}
        prompt[speaker_id] = node
        dialogue[f"speaker_{i}"] = [speaker_id, 0]
    return prompt


def add_arguments(p) -> None:
    p.add_argument("--script", type=Path, required=True,
                   help="the script: one 'NAME: text' turn per line, [pause 1.5] for silence")
    p.add_argument("--speaker", action="append", default=[], metavar="NAME=PORTRAIT,VOICE[,LANGUAGE[,SPEED]]",
                   help="one per speaker (up to 6), e.g. --speaker ALICE=alice.png,alice.wav")
    p.add_argument("--layout", choices=("cut", "side_by_side", "grid"), default="side_by_side")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                   help="set an input of every node that has it (or of node NODE), e.g. --set steps=30 --set gap=0.5")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="URL of a running ComfyUI (default http://127.0.0.1:8188)")
    where.add_argument("--comfyui", type=Path, help="start this ComfyUI folder headless for the job")
    p.add_argument("--comfyui-args", default="", help="extra arguments for the headless ComfyUI, e.g. '--lowvram'")
    p.add_argument("--out", type=Path, default=Path("dialogue.mp4"), help="the video; the subtitles go next to it "
                                                                          "as .srt")
    p.add_argument("--timeout", type=float, default=6 * 3600)


def run(args) -> int:
    if not args.script.is_file():
        raise SystemExit(f"--script: no file {args.script}")
    if not args.speaker:
        raise SystemExit("give each speaker with --speaker NAME=portrait.png,voice.wav")
    speakers = [parse_speaker(s) for s in args.speaker]
    dialogue_prompt(json.loads((WORKFLOWS / f"{TEMPLATE}.json").read_text()),
                    [(n, "", "", {}) for n, *_ in speakers], "")  # the cast's own checks, before any server starts
    settings = {f"{DIALOGUE}.layout": args.layout} | ({"seed": args.seed} if args.seed is not None else {})
    with_sets(settings, args.set)

    server = None
    try:
        server, url = connect(args)
        client = ComfyClient(url)
        template = json.loads((WORKFLOWS / f"{TEMPLATE}.json").read_text())
        require_pack(client, template, server)
        cast = [(name, client.upload(image, f"dialogue_{i}_{image.name}"),
                 client.upload(voice, f"dialogue_{i}_{voice.name}"), extra)
                for i, (name, image, voice, extra) in enumerate(speakers, start=1)]
        prompt = prepare(dialogue_prompt(template, cast, args.script.read_text()), settings, {})
        print(f"queued on {url} ...", file=sys.stderr)
        outputs = client.run(prompt, timeout=args.timeout)["outputs"][DIALOGUE]
        args.out.write_bytes(client.view(outputs["images"][0]))
        args.out.with_suffix(".srt").write_bytes(client.view(outputs["nfy_srt"][0]))
    except (ExecutionFailed, RuntimeError) as exc:  # RuntimeError: the headless server did not start
        print(exc, file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
    print(args.out)
    return 0
