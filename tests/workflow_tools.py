"""The shipped workflows: API format is written by hand (workflows/*_api.json); the UI format the browser loads is
derived from it against a live server's /object_info, so both always describe the same graph.

Regenerate the UI files after changing an API file or a node's inputs:
    .venv/bin/python tests/workflow_tools.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN, ROW = 420, 40


def api_workflows() -> dict[str, dict]:
    return {p.name[:-len("_api.json")]: json.loads(p.read_text()) for p in sorted(WORKFLOWS.glob("*_api.json"))}


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
        column = depth_of(node_id)
        y = rows.get(column, ROW)
        height = 60 + 26 * (len(inputs) + len(widgets) + len(outputs))
        rows[column] = y + height + ROW
        nodes.append({"id": int(node_id), "type": api["class_type"], "pos": [40 + column * COLUMN, y],
                      "size": [380, height], "flags": {}, "order": order, "mode": 0,
                      "title": api.get("_meta", {}).get("title", info["display_name"]),
                      "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": api["class_type"]}, "widgets_values": widgets})
    return {"last_node_id": max(map(int, ids)), "last_link_id": len(links), "nodes": nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> int:
    """Start ComfyUI with the pack, read /object_info, write workflows/<name>_ui.json for every API workflow."""
    import tempfile

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from comfy_server import ComfyClient, ComfyServer
    from conftest import REPO, recorded_path

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(recorded_path("COMFYUI_DIR")), REPO, Path(base)).start()
        try:
            info = ComfyClient(server.url).object_info()
        finally:
            server.stop()
    for name, prompt in api_workflows().items():
        (WORKFLOWS / f"{name}_ui.json").write_text(json.dumps(api_to_ui(prompt, info), indent=1) + "\n")
        print(f"wrote workflows/{name}_ui.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
