"""The pack's browser extension (js/) in the real ComfyUI frontend, driven in headless Chromium over DevTools.

Checks that the extension loads once and without errors of its own, that the text read-out (NFY_TextBPE,
NFY_Narrate) counts exactly the chunks the Python splitter cuts and the seconds and frames that follow from them,
that the voice read-out decodes the linked LoadAudio clip and warns about short ones, that a video made by NFY_AVMux
plays inline with its sound, and that every shipped UI workflow (workflows/*.json) loads with its read-outs.
Chromium missing skips these tests on a developer's machine and fails them under CI=true.
The screenshot goes to the test's tmp dir and, when NFY_ARTIFACTS is set, into that folder.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import av
import pytest

from comfy_server import PACK_NAME, ComfyClient
from conftest import MEDIA, REPO
from narrate_model.xtts.text import char_limit, split_sentences


EXTENSION = f"/extensions/{PACK_NAME}/"  # WEB_DIRECTORY, served under the pack's folder name
OUR_SCRIPTS = ("/narrate_aids.js", "/text_chunks.js")
EN_CHARS_PER_SECOND = 14  # js/text_chunks.js: the documented speaking-rate estimate
# What the frontend 1.32 and the server log on every start, whatever the pack does: files a fresh user has not got
# (404), the blocked call to api.comfy.org (the page's CSP, and offline anyway), and the frontend's own settings
# onChange handler failing once at load; and the preview a new LoadAudio / LoadVideo fetches before the test has set
# its file (its list was empty when the page loaded).
FRONTEND_NOISE = ("/user.css", "/favicon.ico", "/api/userdata", "api.comfy.org", "at onChange (", "filename=undefined")


def expected_stats(text: str, language: str, split: bool = True, fps: float = 25, speed: float = 1) -> dict:
    """The read-out as the Python side defines it: tokenize() strips the text, then split_sentences cuts it."""
    text = text.strip()
    chunks = split_sentences(text, language) if split else [text]
    chars = sum(len(c) for c in chunks)
    seconds = chars / (EN_CHARS_PER_SECOND * char_limit(language) / 250) / speed
    return {"chars": chars, "chunks": len(chunks), "longest": max(map(len, chunks)), "limit": char_limit(language),
            "frames": math.ceil(seconds * fps), "seconds": seconds}


def write_clip(source: Path, seconds: float, path: Path) -> Path:
    """The first seconds of a video's soundtrack as a 16-bit WAV (what a user drops into LoadAudio)."""
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.audio[0]
        out = dst.add_stream("pcm_s16le", rate=stream.rate, layout="mono")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=stream.rate)
        wanted, written = int(seconds * stream.rate), 0
        for frame in src.decode(stream):
            for piece in resampler.resample(frame):
                array = piece.to_ndarray()[:, : wanted - written]
                if array.shape[1] == 0:
                    continue
                chunk = av.AudioFrame.from_ndarray(array, format="s16", layout="mono")
                chunk.sample_rate = stream.rate
                dst.mux(out.encode(chunk))
                written += array.shape[1]
            if written >= wanted:
                break
        dst.mux(out.encode(None))
    return path


@pytest.fixture(scope="module")
def page(comfy_server):
    from browser import Browser, require_chromium

    chromium = require_chromium()

    settings = comfy_server.base / "user" / "default" / "comfy.settings.json"  # skip the first-visit template dialog
    settings.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(settings.read_text()) if settings.exists() else {}
    settings.write_text(json.dumps({**stored, "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    with Browser(chromium, window=(1840, 1080)) as browser:
        browser.navigate(comfy_server.url)
        browser.wait_for("window.app?.graph && app.extensions?.some(e => e.name === 'narrating_for_you.aids')", 60)
        browser.evaluate("app.graph.clear()")  # not the default SD graph: only what the tests build
        yield browser


def add_node(page, node_type: str, pos: tuple[int, int], size: tuple[int, int] | None = None) -> int:
    size_js = f"n.setSize([{size[0]}, {size[1]}]);" if size else ""
    return page.evaluate(f"(() => {{ const n = LiteGraph.createNode({node_type!r}); n.pos = [{pos[0]}, {pos[1]}]; "
                         f"{size_js} app.graph.add(n); return n.id; }})()")


def connect(page, source: int, slot: int, target: int, input_name: str) -> None:
    page.evaluate(f"(() => {{ const t = app.graph.getNodeById({target}); "
                  f"app.graph.getNodeById({source}).connect({slot}, t, t.findInputSlot({input_name!r})); }})()")


def readout(page, node_id: int, name: str) -> dict:
    return page.evaluate(f"""(() => {{
        const el = app.graph.getNodeById({node_id}).widgets.find(w => w.name === {name!r}).element;
        return {{...el.dataset, text: el.innerText}}; }})()""")


def own_errors(page) -> list[dict]:
    """Console errors and uncaught exceptions that come from this pack's scripts."""
    entries = page.exceptions + [m for m in page.console if m["type"] == "error"]
    return [e for e in entries if any(s in json.dumps(e) for s in (*OUR_SCRIPTS, "narrating_for_you.aids"))]


def test_the_extension_loads_once_without_errors(page, comfy_server):
    served = ComfyClient(comfy_server.url).get_json("/extensions")
    assert f"{EXTENSION}narrate_aids.js" in served and f"{EXTENSION}text_chunks.js" in served
    # pyproject's [tool.comfy] web may serve js/ a second time under the project name: still one registration.
    assert page.evaluate("app.extensions.filter(e => e.name === 'narrating_for_you.aids').length") == 1
    node = add_node(page, "NFY_TextBPE", (0, 0))
    assert page.evaluate(f"app.graph.getNodeById({node}).widgets.filter(w => w.type === 'nfy_readout').length") == 1
    page.evaluate(f"app.graph.remove(app.graph.getNodeById({node}))")
    assert own_errors(page) == []


def test_js_splitter_cuts_the_same_chunks_as_python(page):
    rng = random.Random(7)
    words = ["hello", "world", "Dr.", "3.5", "it's", "naïve", "«quoted»", "(aside)", "x" * 30, "日本語の文", "中文句子",
             "ok", "😀", "\u00a0", "end.", "\x85", "a\x1cb", "\ufeffz"]  # whitespace to Python only / JS only
    marks = ["", "", "", ".", "!", "?", "…", ",", ";", ":", " —", "。", "！", "、", "\n", "?!", ".\"", "؟", "।"]
    texts = ["Hello! This is my voice, narrating for you.", "One.\n\nTwo?  Three…four", "a" * 600, "   ",
             "第一句。第二句！第三句？" * 20, "Он сказал: «Привет». А потом ушёл; всё."]
    for _ in range(60):
        texts.append(" ".join(rng.choice(words) + rng.choice(marks) for _ in range(rng.randint(1, 80))))
    cases = [(t, lang, limit) for t in texts for lang, limit in (("en", None), ("ja", None), ("en", 17), ("en", 40))]
    got = page.evaluate(f"""import('{EXTENSION}text_chunks.js').then(m =>
        {json.dumps(cases)}.map(([t, lang, limit]) => m.splitSentences(t, lang, limit ?? undefined)))""")
    for (text, lang, limit), js_chunks in zip(cases, got, strict=True):
        assert js_chunks == split_sentences(text, lang, limit), (text, lang, limit)


def test_text_readout_counts_what_the_node_will_speak(page):
    node = add_node(page, "NFY_TextBPE", (40, 40), (440, 260))
    text = ("Hello! This is my voice, narrating for you. " * 9 + "A last line\nafter a break… and more words here. "
            "¿Qué tal? Très bien.")

    def type_text(value: str) -> None:  # as the user types: the textarea's input event
        page.evaluate(f"""(() => {{ const w = app.graph.getNodeById({node}).widgets.find(w => w.name === 'text');
            w.inputEl.value = {json.dumps(value)}; w.inputEl.dispatchEvent(new Event('input')); }})()""")

    def set_widget(name: str, value) -> None:  # as the combo / toggle does: new value, then the callback
        page.evaluate(f"""(() => {{ const w = app.graph.getNodeById({node}).widgets.find(w => w.name === {name!r});
            w.value = {json.dumps(value)}; w.callback?.(w.value); }})()""")

    type_text(text)
    for language in ("en", "ja", "zh-cn", "fr"):
        set_widget("language", language)
        shown, want = readout(page, node, "nfy_text_readout"), expected_stats(text, language)
        for key in ("chars", "chunks", "longest", "limit", "frames"):
            assert int(shown[key]) == want[key], (language, key, shown, want)
        assert f"{want['chars']} chars · {want['chunks']} chunks" in shown["text"]
        assert f"≈ {want['seconds']:.1f} s of speech · {want['frames']} frames @ 25 fps" in shown["text"]
        assert shown["level"] == "ok"
    set_widget("split_sentences", False)  # one chunk over the limit: warned
    shown, want = readout(page, node, "nfy_text_readout"), expected_stats(text, "fr", split=False)
    assert (int(shown["chunks"]), int(shown["longest"])) == (1, want["longest"]) and want["longest"] > 273
    assert shown["level"] == "warn" and "over the 273-char limit" in shown["text"]
    set_widget("split_sentences", True)
    type_text("Short.")
    assert int(readout(page, node, "nfy_text_readout")["chars"]) == 6
    source = add_node(page, "PrimitiveStringMultiline", (500, 40))  # text from a link: unknown until it runs
    connect(page, source, 0, node, "text")
    assert "text comes from a link" in readout(page, node, "nfy_text_readout")["text"]
    page.evaluate(f"app.graph.remove(app.graph.getNodeById({source}))")
    assert readout(page, node, "nfy_text_readout")["chars"] == "6"
    # The read-out stays out of the saved workflow and the prompt.
    values = page.evaluate(f"app.graph.getNodeById({node}).serialize().widgets_values")
    assert values == ["Short.", "fr", True]
    prompt = page.evaluate("app.graphToPrompt().then(p => p.output)")
    assert set(prompt[str(node)]["inputs"]) == {"text", "language", "split_sentences"}
    page.evaluate(f"app.graph.remove(app.graph.getNodeById({node}))")  # the encoder node needs no xtts for this


@pytest.fixture(scope="module")
def clips(comfy_server, tmp_path_factory) -> dict[float, str]:
    folder, client = tmp_path_factory.mktemp("clips"), ComfyClient(comfy_server.url)
    return {s: client.upload(write_clip(MEDIA / "videos" / "man.mp4", s, folder / f"nfy_voice_{s}s.wav"))
            for s in (0.6, 2.0, 6.0)}


def test_voice_readout_measures_the_linked_clip_and_warns_when_short(page, clips):
    loader = add_node(page, "LoadAudio", (40, 350), (320, 200))
    encoder = add_node(page, "NFY_VoiceProfileEncode", (400, 350), (420, 150))
    page.evaluate(f"app.graph.getNodeById({loader}).widgets.find(w => w.name === 'audio').value = '{clips[6.0]}'")
    assert "not connected" in readout(page, encoder, "nfy_voice_readout")["text"]
    connect(page, loader, 0, encoder, "voice")

    def shown_when(level: str) -> dict:
        page.wait_for(f"app.graph.getNodeById({encoder}).nfyVoiceReadout.dataset.level === '{level}' && "
                      f"app.graph.getNodeById({encoder}).nfyVoiceReadout.dataset.seconds", 20)
        return readout(page, encoder, "nfy_voice_readout")

    shown = shown_when("ok")
    assert float(shown["seconds"]) == pytest.approx(6.0, abs=0.05) and "6.0 s" in shown["text"]
    for seconds, level, words in ((2.0, "warn", "short: 3 s or more"), (0.6, "error", "the node will refuse it")):
        page.evaluate(f"""(() => {{ const w = app.graph.getNodeById({loader}).widgets.find(w => w.name === 'audio');
            w.value = '{clips[seconds]}'; w.callback?.(w.value); }})()""")  # the user picks another clip
        shown = shown_when(level)
        assert float(shown["seconds"]) == pytest.approx(seconds, abs=0.05) and words in shown["text"]
    page.evaluate(f"""(() => {{ const w = app.graph.getNodeById({loader}).widgets.find(w => w.name === 'audio');
        w.value = '{clips[2.0]}'; w.callback?.(w.value); }})()""")
    shown_when("warn")


def test_muxed_video_plays_inline_with_its_sound(page, comfy_server):
    name = ComfyClient(comfy_server.url).upload(MEDIA / "videos" / "kid_1.mp4")
    loader = add_node(page, "LoadVideo", (40, 600), (320, 120))
    parts = add_node(page, "GetVideoComponents", (400, 600))
    mux = add_node(page, "NFY_AVMux", (860, 40), (420, 480))
    page.evaluate(f"app.graph.getNodeById({loader}).widgets.find(w => w.name === 'file').value = '{name}'")
    page.evaluate(f"app.graph.getNodeById({mux}).widgets.find(w => w.name === 'filename_prefix').value = "
                  "'nfy_test/frontend'")
    connect(page, loader, 0, parts, "video")
    connect(page, parts, 0, mux, "images")
    connect(page, parts, 1, mux, "audio")
    page.evaluate("app.queuePrompt(0, 1)")  # the Queue button's path: the page gets the `executed` message
    video = page.wait_for(f"""(() => {{ const v = app.graph.getNodeById({mux}).videoContainer?.querySelector('video');
        return v && v.readyState >= 2 && {{src: v.src, muted: v.muted, controls: v.controls,
                                            duration: v.duration}}; }})()""", 60)
    assert "/view?" in video["src"] and "nfy_test" in video["src"] and ".mp4" in video["src"]
    assert video["controls"] and not video["muted"]
    assert video["duration"] == pytest.approx(3.2, abs=0.05)  # kid_1.mp4: 80 frames at 25 fps
    decoded = page.evaluate(f"""(async () => {{
        const v = app.graph.getNodeById({mux}).videoContainer.querySelector('video');
        await v.play(); await new Promise(r => setTimeout(r, 1200)); v.pause();
        return {{audio: v.webkitAudioDecodedByteCount, video: v.webkitVideoDecodedByteCount, muted: v.muted}}; }})()""")
    assert decoded["audio"] > 0 and decoded["video"] > 0 and not decoded["muted"], decoded


def test_narrate_readouts_follow_its_fps_speed_and_voice(page, clips):
    node = add_node(page, "NFY_Narrate", (1320, 40))
    bottom = page.evaluate(f"(n => n.pos[1] + n.size[1])(app.graph.getNodeById({node}))")
    loader = add_node(page, "LoadAudio", (1320, bottom + 60), (320, 200))
    text = "Bonjour ! Je suis ta voix, et je raconte pour toi. " * 4
    page.evaluate(f"""(() => {{ const n = app.graph.getNodeById({node}), w = n.widgets.find(w => w.name === 'text');
        w.inputEl.value = {json.dumps(text)}; w.inputEl.dispatchEvent(new Event('input'));
        for (const [name, value] of [['language', 'fr'], ['fps', 30], ['speed', 1.25]]) {{
            const v = n.widgets.find(w => w.name === name); v.value = value; v.callback?.(v.value); }}
        const a = app.graph.getNodeById({loader}).widgets.find(w => w.name === 'audio');
        a.value = '{clips[6.0]}'; a.callback?.(a.value); }})()""")
    shown, want = readout(page, node, "nfy_text_readout"), expected_stats(text, "fr", fps=30, speed=1.25)
    assert (int(shown["chars"]), int(shown["chunks"]), int(shown["frames"]), float(shown["fps"])) == \
           (want["chars"], want["chunks"], want["frames"], 30)
    assert f"≈ {want['seconds']:.1f} s of speech at speed 1.25 · {want['frames']} frames @ 30 fps" in shown["text"]
    connect(page, loader, 0, node, "voice")
    page.wait_for(f"app.graph.getNodeById({node}).nfyVoiceReadout.dataset.seconds", 20)
    assert "voice: 6.0 s" in readout(page, node, "nfy_voice_readout")["text"]


def test_screenshot_of_the_aids_and_no_errors_of_our_own(page, tmp_path):
    node = add_node(page, "NFY_TextBPE", (40, 40), (440, 250))
    page.evaluate(f"""(() => {{ const w = app.graph.getNodeById({node}).widgets.find(w => w.name === 'text');
        w.inputEl.value = {json.dumps("Hello! This is my voice, narrating for you. " * 7 + "Thank you.")};
        w.inputEl.dispatchEvent(new Event('input'));
        app.canvas.ds.offset = [30, 110]; app.canvas.ds.scale = 1; app.graph.setDirtyCanvas(true, true); }})()""")
    page.evaluate("new Promise(r => setTimeout(r, 600))")  # let the canvas and the DOM widgets settle
    shot = page.screenshot(tmp_path / "frontend_narrate.png")
    if os.environ.get("NFY_ARTIFACTS"):
        Path(os.environ["NFY_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["NFY_ARTIFACTS"]) / shot.name)
    assert shot.stat().st_size > 10_000
    assert own_errors(page) == [], own_errors(page)
    errors = [m for m in page.console if m["type"] == "error"]
    unexpected = [e for e in errors if not any(n in e["text"] + e["url"] for n in FRONTEND_NOISE)]
    assert unexpected == [], unexpected
    assert page.exceptions == []


def test_a_missing_chromium_fails_the_run(monkeypatch, tmp_path):
    from browser import require_chromium

    absent = str(tmp_path / "no-chromium")
    for ci in ("true", ""):  # in CI and on a developer's machine alike: the js/ layer is never silently untested
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception):
            require_chromium(absent)


WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))  # the UI templates (API prompts are in workflows/api/)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.name for w in WORKFLOWS])
def test_shipped_workflows_load_with_their_readouts(page, workflow):
    before = len(page.exceptions)
    graph = json.loads(workflow.read_text())
    types = sorted({n["type"] for n in graph["nodes"]})
    missing = page.evaluate(f"{json.dumps(types)}.filter(t => !LiteGraph.registered_node_types[t])")
    assert missing == [], f"{workflow.name} uses node types the server does not have: {missing}"
    page.evaluate(f"app.loadGraphData({json.dumps(graph)})")
    nodes = page.evaluate("""app.graph._nodes.map(n => ({id: n.id, type: n.comfyClass,
        widgets: Object.fromEntries((n.widgets ?? []).map(w => [w.name, w.element?.dataset?.nfy ? {...w.element.dataset} : w.value])),
        linkedText: !!n.inputs?.some((i, k) => i.name === 'text' && n.isInputConnected(k))}))""")
    for node in nodes:
        if node["type"] in ("NFY_TextBPE", "NFY_Narrate"):
            shown = node["widgets"]["nfy_text_readout"]
            if not node["linkedText"] and node["widgets"]["text"].strip():
                widgets = node["widgets"]
                want = expected_stats(widgets["text"], widgets["language"], widgets.get("split_sentences", True),
                                      float(widgets.get("fps", 25)), float(widgets.get("speed", 1)))
                assert (int(shown["chars"]), int(shown["chunks"]), int(shown["frames"])) == \
                       (want["chars"], want["chunks"], want["frames"]), (workflow.name, node, want)
        if node["type"] in ("NFY_VoiceProfileEncode", "NFY_Narrate"):
            assert "nfy_voice_readout" in node["widgets"], (workflow.name, node)
    assert page.exceptions[before:] == []
    # A workflow names input files this server may not have: their 404s are expected, nothing else of ours is.
    assert [e for e in own_errors(page) if "Failed to load resource" not in e["text"]] == []
