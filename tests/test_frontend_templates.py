"""The pack as a user meets it in today's ComfyUI frontends: the pinned one (ComfyUI 0.3.75's 1.32.9) and the newest
comfyui-frontend-package tests/install.sh fetched (served with --front-end-root), each in the canvas and in the
Vue-nodes mode, on a fresh server with no weights.

For every template: it opens from the template browser (the Templates dialog, a click on its card), the read-outs
show, the frontend's own graphToPrompt turns it into exactly its API twin (workflows/api/, what the CLI runs: so the
UI file is not only checked against the converter that generated it), and our scripts log no errors. On the newest
frontend the narrate template's missing-models dialog names the weights to fetch (the workflow's model metadata);
its screenshot goes to $NFY_ARTIFACTS like the other frontend screenshot.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_server import PACK_NAME, ComfyClient, ComfyServer
from conftest import REPO, recorded_path
from workflow_tools import TEMPLATES, api_workflows, ui_path

OURS = ("/narrate_aids.js", "/text_chunks.js", "narrating_for_you.aids")


def newest_frontend() -> str:
    """The newest frontend's static folder, as tests/install.sh recorded it; missing fails the run."""
    root = recorded_path("NFY_NEWEST_FRONTEND")
    if root and (Path(root) / "index.html").exists():
        return root
    message = "no newest comfyui-frontend-package: run tests/install.sh (it records NFY_NEWEST_FRONTEND)"
    pytest.fail(message)


@pytest.fixture(scope="module", params=["pinned", "newest"])
def server(request, tmp_path_factory):
    extra = () if request.param == "pinned" else ("--front-end-root", newest_frontend())
    base = tmp_path_factory.mktemp(f"frontend_{request.param}")
    started = ComfyServer(Path(recorded_path("COMFYUI_DIR")), REPO, base, extra).start()
    started.frontend = request.param
    yield started
    started.stop()


@pytest.fixture(scope="module", params=["canvas", "vue"])
def page(request, server):
    from browser import Browser, require_chromium

    settings = server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.VueNodes.Enabled": request.param == "vue"}))
    with Browser(require_chromium(), window=(1600, 1000)) as browser:
        browser.navigate(server.url)
        browser.wait_for("!!(window.app?.graph && app.extensions?.some(e => e.name === 'narrating_for_you.aids'))",
                         90)
        assert browser.evaluate("app.ui.settings.getSettingValue('Comfy.VueNodes.Enabled')") == \
            (request.param == "vue") or server.frontend == "pinned"
        browser.mode = request.param
        yield browser


def own_errors(page) -> list[dict]:
    entries = page.exceptions + [m for m in page.console if m["type"] == "error"]
    return [e for e in entries if any(s in json.dumps(e) for s in OURS)]


def click_text(page, text: str, timeout: float = 30, within: str = "[role=dialog]") -> None:
    """Clicks the visible element (of an open dialog) whose own text is `text`, as a user would."""
    page.wait_for(f"""(() => {{ const el = [...document.querySelectorAll('{within} *')].find(e =>
        e.children.length === 0 && e.textContent.trim() === {json.dumps(text)} && e.offsetParent);
        if (!el) return false; el.scrollIntoView(); el.click(); return true; }})()""", timeout)


def open_from_template_browser(page, title: str) -> None:
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    click_text(page, PACK_NAME)  # the pack's category (its folder name) in the dialog's side bar
    click_text(page, title)  # its card


def close_dialogs(page) -> None:
    for _ in range(3):
        page.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                             "windowsVirtualKeyCode": 27})
        page.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Escape", "code": "Escape",
                                             "windowsVirtualKeyCode": 27})
        time.sleep(0.2)


def declared(prompt: dict, object_info: dict) -> dict:
    """The prompt as the server reads it: each node's declared inputs (the frontend also sends values of UI-only
    widgets, e.g. LoadAudio's "audioUI", which the server ignores) and no _meta."""
    def names(info):
        return {n for section in ("required", "optional") for n in info["input"].get(section, {})}
    return {k: {"class_type": v["class_type"],
                "inputs": {n: x for n, x in v["inputs"].items() if n in names(object_info[v["class_type"]])}}
            for k, v in prompt.items()}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_opens_from_the_browser_into_its_api_twin(page, server, name, tmp_path):
    graph = json.loads(ui_path(name).read_text())
    before = (len(page.exceptions), len(page.console))
    page.evaluate("app.graph.clear()")
    open_from_template_browser(page, TEMPLATES[name])
    want_types = sorted(n["type"] for n in graph["nodes"])
    page.wait_for(f"JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === {json.dumps(json.dumps(want_types, separators=(',', ':')))}", 30)
    if server.frontend == "newest" and name == "narrate" and page.mode == "canvas":
        # No weights on this server: the frontend's pre-run check flags the loaders, and its details list the files
        # the template's model metadata names (name, folder, URL).
        click_text(page, "View details", within="body")
        text = page.wait_for("document.body.innerText.includes('net.pth') && document.body.innerText", 30)
        assert "sd-vae-ft-mse.safetensors" in text
        time.sleep(1)
        shot = page.screenshot(tmp_path / "frontend_missing_models.png")
        if os.environ.get("NFY_ARTIFACTS"):
            Path(os.environ["NFY_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(os.environ["NFY_ARTIFACTS"]) / shot.name)
    close_dialogs(page)
    # The read-outs show on the pack's text and voice nodes.
    shown = page.evaluate("""app.graph._nodes.filter(n => n.nfyTextReadout || n.nfyVoiceReadout).map(n =>
        [n.type, (n.nfyTextReadout ?? n.nfyVoiceReadout).innerText.trim()])""")
    want_aids = [n["type"] for n in graph["nodes"]
                 if n["type"] in ("NFY_TextBPE", "NFY_Narrate", "NFY_VoiceProfileEncode")]
    assert sorted(t for t, _ in shown) == sorted(want_aids) and all(text for _, text in shown), shown
    if ("NFY_VoiceProfileEncode" in want_aids or "NFY_Narrate" in want_aids) \
            and any(n["type"] == "LoadAudio" for n in graph["nodes"]):  # a voice file the read-out can decode
        # The voice read-out decodes the example clip, and follows a file change made without any callback (what
        # only the extension's timer notices: the Vue-nodes mode never calls onDrawForeground).
        voice = "app.graph._nodes.find(n => n.nfyVoiceReadout).nfyVoiceReadout"
        assert abs(float(page.wait_for(f"{voice}.dataset.seconds", 30)) - 9.39) < 0.05
        page.evaluate("""(() => { const w = app.graph._nodes.find(n => n.type === 'LoadAudio').widgets
            .find(w => w.name === 'audio'); w.value = 'nfy_example_speech.flac'; })()""")
        assert abs(float(page.wait_for(f"{voice}.dataset.seconds !== '{page.evaluate(voice + '.dataset.seconds')}' "
                                       f"&& {voice}.dataset.seconds", 30)) - 3.9) < 0.05
        page.evaluate("""(() => { const w = app.graph._nodes.find(n => n.type === 'LoadAudio').widgets
            .find(w => w.name === 'audio'); w.value = 'nfy_example_voice.flac'; })()""")
        page.wait_for(f"Math.abs({voice}.dataset.seconds - 9.39) < 0.05", 30)
    # Runnable: the frontend's own conversion gives exactly the API prompt the CLI and the HTTP API use.
    prompt = page.evaluate("app.graphToPrompt().then(p => p.output)")
    info = ComfyClient(server.url).object_info()
    assert declared(prompt, info) == declared(api_workflows()[name], info)
    assert declared(api_workflows()[name], info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                     for k, v in api_workflows()[name].items()}  # nothing dropped
    new_exceptions = page.exceptions[before[0]:]
    assert [e for e in new_exceptions if any(s in json.dumps(e) for s in OURS)] == []
    assert own_errors(page) == [], own_errors(page)
