"""`python -m narrate_model narrate`: run a shipped workflow on an image, a voice and a text against a ComfyUI server
(a running one, or one started headless for the job) and write the .mp4. For batch users and scripts."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .client import ComfyClient, ExecutionFailed, HeadlessServer

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows" / "api"  # the UI templates are in workflows/
MEDIA_INPUTS = {"LoadImage": "image", "LoadAudio": "audio"}


def add_arguments(p) -> None:
    p.add_argument("--image", type=Path, help="the portrait (not needed for speech_only)")
    p.add_argument("--voice", type=Path, required=True,
                   help="the voice profile clip; for animate_from_audio, the speech to animate")
    p.add_argument("--text", help="what to say (or --text-file)")
    p.add_argument("--text-file", type=Path, help="read the text from this file")
    p.add_argument("--language", default="en")
    p.add_argument("--seed", type=int)
    p.add_argument("--workflow", default="narrate_simple",
                   help="a workflow in the pack's workflows/api/ folder: narrate_simple (default), narrate, speech_only, "
                        "animate_from_audio; or the path of an API-format workflow")
    p.add_argument("--set", action="append", default=[], metavar="[NODE.]INPUT=VALUE",
                   help="set an input of every node that has it (or of node NODE); VALUE is JSON or a plain string, "
                        "e.g. --set steps=30 --set 7.checkpoint=net.safetensors")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="URL of a running ComfyUI (default http://127.0.0.1:8188)")
    where.add_argument("--comfyui", type=Path, help="start this ComfyUI folder headless for the job")
    p.add_argument("--comfyui-args", default="", help="extra arguments for the headless ComfyUI, e.g. '--lowvram'")
    p.add_argument("--out", type=Path, default=Path("narration.mp4"), help="where to write the result")
    p.add_argument("--timeout", type=float, default=6 * 3600)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def with_sets(settings: dict, items: list[str]) -> dict:
    """`settings` updated with each `--set INPUT=VALUE` (VALUE read as JSON where it parses, else as text)."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected INPUT=VALUE")
        settings[key] = _value(value)
    return settings


def connect(args) -> tuple[HeadlessServer | None, str]:
    """(the headless ComfyUI started here for --comfyui, for the caller to stop, or None; the URL to queue on)."""
    if args.comfyui:
        server = HeadlessServer(args.comfyui, headless_args(shlex.split(args.comfyui_args))).start()
        return server, server.url
    return None, args.server or "http://127.0.0.1:8188"


def prepare(prompt: dict, settings: dict[str, object], uploads: dict[str, str]) -> dict:
    """Sets inputs: `settings` maps "input" (every node that has it) or "node.input" to a value; `uploads` maps
    LoadImage / LoadAudio to an uploaded file name."""
    prompt = json.loads(json.dumps(prompt))
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        media = MEDIA_INPUTS.get(node["class_type"])
        if media and node["class_type"] in uploads:
            inputs[media] = uploads[node["class_type"]]
        for key, value in settings.items():
            target, _, name = key.rpartition(".")
            if (target in ("", node_id)) and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
    return prompt


def _workflow(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else WORKFLOWS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"no workflow {name!r}: expected {path}")
    return json.loads(path.read_text())


def gpu_visible() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def headless_args(extra: list[str]) -> list[str]:
    """The headless ComfyUI's arguments: `--cpu` is added when torch sees no GPU, as ComfyUI would otherwise stop
    at start-up looking for CUDA."""
    if "--cpu" in extra or gpu_visible():
        return extra
    print("torch sees no GPU here: starting ComfyUI with --cpu (slow; fine for a first try)", file=sys.stderr)
    return ["--cpu", *extra]


def require_pack(client: ComfyClient, prompt: dict, server: HeadlessServer | None) -> None:
    """Fails with what to do when the ComfyUI does not know the workflow's nodes of this pack."""
    ours = sorted({n["class_type"] for n in prompt.values() if n["class_type"].startswith("NFY_")})
    known = client.object_info()
    if all(name in known for name in ours):
        return
    pack = Path(__file__).resolve().parents[1]
    where = server.comfyui_dir if server else "your ComfyUI folder"
    log = server.log() if server else ""
    failed = [line.strip() for line in log.splitlines() if "(IMPORT FAILED)" in line]
    if failed:
        raise ExecutionFailed(f"ComfyUI could not import some custom nodes ({'; '.join(failed)}); the end of its "
                              f"log:\n{log[-4000:]}")
    raise ExecutionFailed(
        f"the Narrating For You nodes are not installed in the ComfyUI at {client.url} (missing: {', '.join(ours)}). "
        f"Install the pack into it, then run this again:\n  ln -s {pack} {where}/custom_nodes/\n"
        f"  {sys.executable} -m pip install -r {pack / 'requirements.txt'}")


def run(args) -> int:
    prompt = _workflow(args.workflow)
    text = args.text_file.read_text() if args.text_file else args.text
    classes = {n["class_type"] for n in prompt.values()}
    if text is None and any("text" in n["inputs"] for n in prompt.values()):
        raise SystemExit("give the text to speak with --text or --text-file")
    if "LoadImage" in classes and not args.image:
        raise SystemExit(f"the {args.workflow} workflow animates a portrait: give it with --image")
    settings = {"language": args.language} | ({"text": text} if text is not None else {})
    settings |= {"seed": args.seed} if args.seed is not None else {}
    with_sets(settings, args.set)

    server = None
    try:
        server, url = connect(args)
        client = ComfyClient(url)
        require_pack(client, prompt, server)
        uploads = {"LoadAudio": client.upload(args.voice)}
        if args.image:
            uploads["LoadImage"] = client.upload(args.image)
        print(f"queued on {url} ...", file=sys.stderr)
        entry = client.run(prepare(prompt, settings, uploads), timeout=args.timeout)
        saved = [item for out in entry["outputs"].values() for key in ("images", "audio")
                 for item in out.get(key, []) if item["filename"].endswith((".mp4", ".flac"))]
        if not saved:
            raise ExecutionFailed("the workflow finished without a saved video or audio")
        out = args.out if saved[0]["filename"].endswith(".mp4") else args.out.with_suffix(".flac")
        out.write_bytes(client.view(saved[0]))
    except (ExecutionFailed, RuntimeError) as exc:  # RuntimeError: the headless server did not start
        print(exc, file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
    print(out)
    return 0
