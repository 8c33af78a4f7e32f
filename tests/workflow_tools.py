"""The shipped workflows: API format is written by hand (workflows/api/<name>.json, what the CLI and the HTTP API
use); the UI format the browser loads is derived from it against a live server's /object_info, so both always
describe the same graph. The UI files sit directly in workflows/, where ComfyUI lists them as the pack's templates:
the template browser shows the file name as the title and <name>.jpg as the thumbnail (TEMPLATES below).

Regenerate the UI files after changing an API file or a node's inputs (and their thumbnails):
    .venv/bin/python tests/workflow_tools.py --thumbnails
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API = WORKFLOWS / "api"
EXAMPLE_INPUTS = WORKFLOWS / "inputs"  # what the templates name; the pack copies them into ComfyUI's input/
# API name -> template title (the UI file's name without .json)
TEMPLATES = {"narrate_simple": "Narrate a portrait (one node)", "narrate": "Narrate a portrait (every stage)",
             "speech_only": "Clone a voice (speech only)", "animate_from_audio": "Animate a portrait from speech",
             "personalize_narrate": "Personalize from a video, then narrate",
             "dialogue": "Dialogue of two speakers (one script)"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN, ROW = 420, 40


def api_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(API.glob("*.json"))}


def ui_path(name: str) -> Path:
    """The UI template of the API workflow `name`."""
    return WORKFLOWS / f"{TEMPLATES[name]}.json"


# ComfyUI model folder names (nodes/common.py MODEL_FOLDERS, core "vae") by their path under models/.
MODEL_DIRECTORIES = {"narrate/hallo": "narrate_hallo", "narrate/face_analysis": "narrate_face_analysis", "vae": "vae"}


def model_metadata(value) -> list[dict]:
    """The frontend's model metadata ({name, url, directory, hash, hash_type}: what its missing-models dialog offers
    to fetch) for a widget value that names a published weight file of narrate_model.weights; [] otherwise."""
    from narrate_model.weights import REGISTRY

    found = []
    for entry in REGISTRY:
        folder, _, name = entry.dest.rpartition("/")
        if name == value and entry.published and entry.public_url() and folder in MODEL_DIRECTORIES:
            meta = {"name": name, "url": entry.public_url(), "directory": MODEL_DIRECTORIES[folder]}
            if entry.sha256:
                meta.update(hash=entry.sha256, hash_type="sha256")
            found.append(meta)
    return found


def _inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node class's inputs in the order its widgets are serialised: required, then optional."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section) or list(specs)
        out += [(name, specs[name]) for name in order if name in specs]
    return out


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """A LiteGraph (UI format) workflow equal to an API prompt, laid out in columns by graph depth."""
    depth: dict[str, int] = {}

    def depth_of(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max(map(depth_of, sources), default=-1)
        return depth[node_id]

    ids = sorted(prompt, key=int)
    rows: dict[int, float] = {}
    nodes, links = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for node_id in ids:
        for name, value in prompt[node_id]["inputs"].items():
            if _is_link(value):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), None, None, name])
                outputs_links.setdefault((value[0], value[1]), []).append(len(links))
    link_by_target = {(str(l[3]), l[6]): l for l in links}

    for order, node_id in enumerate(ids):
        api = prompt[node_id]
        info = object_info[api["class_type"]]
        inputs, widgets = [], []
        for name, spec in _inputs(info):
            value = api["inputs"].get(name, (spec[1] if len(spec) > 1 else {}).get("default"))
            options = spec[1] if len(spec) > 1 else {}
            if _is_widget(spec):
                link = link_by_target.get((node_id, name))
                if link:  # a widget fed by a link (e.g. fps from Get Video Components): an input that names it
                    link[4], link[5] = len(inputs), spec[0] if isinstance(spec[0], str) else "COMBO"
                    inputs.append({"name": name, "type": link[5], "link": link[0], "widget": {"name": name}})
                    value = options.get("default")
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if options.get("image_upload") or options.get("audio_upload"):
                    widgets.append("image" if options.get("image_upload") else None)
            elif (node_id, name) in link_by_target or not options.get("optional"):
                link = link_by_target.get((node_id, name))
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                if link:
                    link[4], link[5] = len(inputs), kind
                inputs.append({"name": name, "type": kind, "link": link[0] if link else None})
        outputs = [{"name": out_name, "type": kind, "links": outputs_links.get((node_id, slot), []), "slot_index": slot}
                   for slot, (kind, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        models = [m for value in widgets for m in model_metadata(value)]
        column = depth_of(node_id)
        y = rows.get(column, ROW)
        height = 60 + 26 * (len(inputs) + len(widgets) + len(outputs))
        rows[column] = y + height + ROW
        nodes.append({"id": int(node_id), "type": api["class_type"], "pos": [40 + column * COLUMN, y],
                      "size": [380, height], "flags": {}, "order": order, "mode": 0,
                      "title": api.get("_meta", {}).get("title", info["display_name"]),
                      "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": api["class_type"], **({"models": models} if models else {})},
                      "widgets_values": widgets})
    models = [m for node in nodes for m in node["properties"].get("models", [])]
    return {"last_node_id": max(map(int, ids)), "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {}, "version": 0.4,
            **({"models": list({m["name"]: m for m in models}.values())} if models else {})}


def write_thumbnails(url: str, base: Path, chromium: str = "/usr/bin/chromium") -> None:
    """workflows/<title>.jpg for every template: the graph as the pinned frontend draws it, example inputs loaded."""
    import base64
    import time
    from io import BytesIO

    from PIL import Image

    from browser import Browser

    settings = base / "user" / "default" / "comfy.settings.json"  # no first-visit or missing-models dialog
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "LiteGraph.Canvas.MinFontSizeForLOD": 1}))  # full detail when zoomed out
    with Browser(chromium, window=(1800, 1200)) as page:
        page.navigate(url)
        page.wait_for("!!(window.app?.graph && app.canvasEl)", 60)
        for name, title in TEMPLATES.items():
            page.evaluate(f"void app.loadGraphData({json.dumps(json.loads(ui_path(name).read_text()))})")
            page.wait_for(f"app.graph._nodes.length === {len(json.loads(ui_path(name).read_text())['nodes'])}", 30)
            # Fit the graph below the menu bar and right of the side bar, at full detail, and crop to it.
            box = page.evaluate("""(() => { const nodes = app.graph._nodes, left = 80, top = 120, ds = app.canvas.ds;
                const x0 = Math.min(...nodes.map(n => n.pos[0])) - 10, y0 = Math.min(...nodes.map(n => n.pos[1])) - 40;
                const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + 10;
                const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + 10;
                const scale = Math.min((innerWidth - left - 20) / (x1 - x0), (innerHeight - top - 80) / (y1 - y0));
                ds.scale = scale; ds.offset = [left / scale - x0, top / scale - y0];
                app.graph.setDirtyCanvas(true, true);
                return [left, top, left + (x1 - x0) * scale, top + (y1 - y0) * scale]; })()""")
            time.sleep(2)  # the canvas redraws and the image previews load
            shot = page.send("Page.captureScreenshot", {"format": "png"})["data"]
            image = Image.open(BytesIO(base64.b64decode(shot))).convert("RGB").crop(tuple(round(v) for v in box))
            image.thumbnail((640, 400))
            image.save(WORKFLOWS / f"{title}.jpg", quality=85)
            print(f"wrote workflows/{title}.jpg")


def main() -> int:
    """Start ComfyUI with the pack, read /object_info, write the UI template of every API workflow and, with
    --thumbnails, draw each template in headless Chromium for its thumbnail."""
    import tempfile

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from comfy_server import ComfyClient, ComfyServer
    from conftest import REPO, recorded_path

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(recorded_path("COMFYUI_DIR")), REPO, Path(base)).start()
        try:
            info = ComfyClient(server.url).object_info()
            for name, prompt in api_workflows().items():
                ui_path(name).write_text(json.dumps(api_to_ui(prompt, info), indent=1) + "\n")
                print(f"wrote {ui_path(name).relative_to(WORKFLOWS.parent)}")
            if "--thumbnails" in sys.argv:
                write_thumbnails(server.url, Path(base))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
