// Narrating For You: small read-outs on the pack's nodes, so problems show while the graph is being built.
//  1. Text (NFY_TextBPE, NFY_Narrate): characters, sentence chunks (longest against the language's limit), the
//     estimated speech length (at the node's speed) and the frame count it makes at the node's fps.
//  2. Voice (NFY_VoiceProfileEncode, NFY_Narrate): the length of the clip a linked LoadAudio holds, decoded in the
//     browser, with a warning under 3 s and an error under 1 s (the node refuses those).
//  3. Video (NFY_AVMux, NFY_StreamToMP4, NFY_Narrate): the frontend itself previews {"images": [mp4],
//     "animated": [true]} as a <video controls>; this only makes sure that preview is never muted.
// It works in the canvas and in the Vue-nodes mode, through the graph API only (no deprecated input.link reads).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { textStats } from "./text_chunks.js";

const TEXT_NODES = new Set(["NFY_TextBPE", "NFY_Narrate"]);
const VOICE_NODES = new Set(["NFY_VoiceProfileEncode", "NFY_Narrate"]);
const VIDEO_NODES = new Set(["NFY_AVMux", "NFY_StreamToMP4", "NFY_Narrate"]);
const DEFAULT_FPS = 25;
const MIN_VOICE_S = 1; // narrate_model/xtts/voice.py MIN_SECONDS: the node raises below it
const GOOD_VOICE_S = 3; // RECOMMENDED_SECONDS

const STYLE = `
.nfy-readout { font: 11px/1.4 ui-monospace, monospace; color: var(--input-text, #ddd); padding: 2px 6px;
  overflow: hidden; box-sizing: border-box; }
.nfy-readout > div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.nfy-readout .nfy-warn { color: #f0b040; }
.nfy-readout .nfy-error { color: #ff6b6b; font-weight: bold; }`;

// Runs fn after the method `key` of obj (a node prototype or a widget), keeping what was there.
function after(obj, key, fn) {
  const previous = obj[key];
  obj[key] = function (...args) {
    const result = previous?.apply(this, args);
    fn.apply(this, args);
    return result;
  };
}

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
// Through the graph API (input.link is deprecated in newer frontends, which warn on every read).
const isConnected = (node, input) => node.isInputConnected(node.inputs.indexOf(input));
const linkedInput = (node, name) => node.inputs?.find((i) => i.name === name && isConnected(node, i));

/** A read-only DOM widget at the bottom of the node; it is left out of the saved workflow and the prompt. */
function addReadout(node, name, lines) {
  const element = document.createElement("div");
  element.className = "nfy-readout";
  element.dataset.nfy = name;
  // The frontend takes the widget's margin off both ends of this height (older ones: a fixed 10 px).
  const height = () => 2 * (widget.margin ?? 10) + 4 + 15.4 * Math.max(lines, element.childElementCount);
  const widget = node.addDOMWidget(name, "nfy_readout", element, {
    serialize: false, hideOnZoom: false, margin: 4, getValue: () => "", setValue: () => {},
    getMinHeight: height, getMaxHeight: height,
  });
  widget.serialize = false;
  return element;
}

function show(node, element, lines) { // lines: [text, level] with level "", "warn" or "error"
  element.replaceChildren(...lines.map(([text, level]) => {
    const line = document.createElement("div");
    line.textContent = line.title = text; // one row per line; a narrow node shows the rest on hover
    if (level) line.className = `nfy-${level}`;
    return line;
  }));
  element.dataset.level = lines.some(([, l]) => l === "error") ? "error" : lines.some(([, l]) => l) ? "warn" : "ok";
  const needed = node.computeSize?.()[1]; // grow the node when a warning adds a line
  if (needed > node.size[1]) node.setSize([node.size[0], needed]);
  node.setDirtyCanvas?.(true, false);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Text read-out
// ---------------------------------------------------------------------------------------------------------------
function updateText(node) {
  const element = node.nfyTextReadout;
  if (!element) return;
  if (linkedInput(node, "text")) {
    delete element.dataset.chars;
    show(node, element, [["text comes from a link: counted when the graph runs", ""]]);
    return;
  }
  const language = widgetOf(node, "language")?.value ?? "en";
  const split = widgetOf(node, "split_sentences")?.value ?? true;
  const positive = (name, fallback) => {
    const value = Number(widgetOf(node, name)?.value);
    return value > 0 ? value : fallback;
  };
  const s = textStats(widgetOf(node, "text")?.value, language, split, positive("fps", DEFAULT_FPS),
                      positive("speed", 1));
  Object.assign(element.dataset, {
    chars: s.chars, chunks: s.chunks, longest: s.longest, limit: s.limit, seconds: s.seconds, frames: s.frames,
    fps: s.fps, speed: s.speed,
  });
  const atSpeed = s.speed === 1 ? "" : ` at speed ${+s.speed.toFixed(2)}`;
  const lines = [
    [`${s.chars} chars · ${s.chunks} chunk${s.chunks === 1 ? "" : "s"} · longest ${s.longest}/${s.limit} (${language})`, ""],
    [`≈ ${s.seconds.toFixed(1)} s of speech${atSpeed} · ${s.frames} frames @ ${+s.fps.toFixed(3)} fps`, ""],
  ];
  if (s.overLimit) {
    lines.push([`⚠ over the ${s.limit}-char limit for ${language}: the speech may be cut short; ` +
                "turn split_sentences on or shorten it", "warn"]);
  }
  show(node, element, lines);
}

function setupText(node) {
  node.nfyTextReadout = addReadout(node, "nfy_text_readout", 3);
  for (const name of ["text", "language", "split_sentences", "fps", "speed"]) {
    const widget = widgetOf(node, name);
    if (widget) after(widget, "callback", () => updateText(node));
  }
  updateText(node);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Voice clip length
// ---------------------------------------------------------------------------------------------------------------
const clipSeconds = new Map(); // /view URL -> Promise of the decoded duration

function decodedSeconds(url) {
  if (!clipSeconds.has(url)) {
    clipSeconds.set(url, api.fetchApi(url)
      .then((r) => { if (!r.ok) throw new Error(`the server answered ${r.status}`); return r.arrayBuffer(); })
      // An offline context decodes without an audio device (and headless); 8 kHz keeps long clips small.
      .then((bytes) => new OfflineAudioContext(1, 1, 8000).decodeAudioData(bytes))
      .then((buffer) => buffer.duration));
  }
  return clipSeconds.get(url);
}

/** The file a voice input plays: {url, name} from a linked LoadAudio (through Reroute nodes), else a note. */
function voiceSource(node, input) {
  let source = node.getInputNode(node.inputs.indexOf(input));
  while (source?.type === "Reroute") source = source.getInputNode(0);
  const widget = source && widgetOf(source, "audio");
  if (!source || source.comfyClass !== "LoadAudio" || !widget?.value) {
    return { note: `${input.name}: ${source ? `from ${source.title}, ` : ""}length known when the graph runs` };
  }
  if (!widget.nfyHooked) { // re-check as soon as the user picks or uploads a clip (maybe over one of the same name)
    widget.nfyHooked = true;
    after(widget, "callback", () => {
      clipSeconds.clear();
      for (const other of app.graph?._nodes ?? []) {
        if (other.nfyVoiceReadout) updateVoice(other, true);
      }
    });
  }
  // The frontend may annotate the name ("clip.wav [output]"); a subfolder comes before the last "/".
  const [, path, type = "input"] = String(widget.value).match(/^(.*?)(?: \[(input|output|temp)\])?$/);
  const cut = path.lastIndexOf("/");
  const query = new URLSearchParams({ filename: path.slice(cut + 1), type, subfolder: cut < 0 ? "" : path.slice(0, cut) });
  return { url: `/view?${query}`, name: path };
}

function voiceLine(input, name, seconds, maxSeconds) {
  const label = `${input.name}: ${seconds.toFixed(1)} s`;
  if (seconds < MIN_VOICE_S) return [`✖ ${label}, under ${MIN_VOICE_S} s: the node will refuse it · ${name}`, "error"];
  if (seconds < GOOD_VOICE_S) return [`⚠ ${label}, short: ${GOOD_VOICE_S} s or more clones better · ${name}`, "warn"];
  return [`${label} · ${name}${maxSeconds && seconds > maxSeconds ? ` · first ${maxSeconds} s used` : ""}`, ""];
}

/** Measures the clips linked to the node's AUDIO inputs; only when the links or file names changed (or `again`). */
async function updateVoice(node, again = false) {
  const element = node.nfyVoiceReadout;
  if (!element) return;
  const inputs = (node.inputs ?? []).filter((i) => i.type === "AUDIO" && (isConnected(node, i) || i.name === "voice"));
  const sources = inputs.map((input) => (isConnected(node, input) ? voiceSource(node, input)
                                                                  : { note: `${input.name}: not connected` }));
  const key = JSON.stringify(sources);
  if (key === node.nfyVoiceKey && !again) return;
  node.nfyVoiceKey = key;
  const maxSeconds = Number(widgetOf(node, "max_seconds")?.value) || 0;
  delete element.dataset.seconds;
  show(node, element, sources.map((s) => [s.note ?? `${s.name}: measuring…`, ""]));
  const seconds = [];
  const lines = await Promise.all(sources.map(async (source, i) => {
    if (source.note) return [source.note, ""];
    try {
      seconds[i] = await decodedSeconds(source.url);
      return voiceLine(inputs[i], source.name, seconds[i], maxSeconds);
    } catch (error) {
      clipSeconds.delete(source.url);
      return [`⚠ ${inputs[i].name}: the browser could not read ${source.name} (${error.message})`, "warn"];
    }
  }));
  if (node.nfyVoiceKey !== key) return; // the links or the file changed while decoding
  element.dataset.seconds = sources.map((_, i) => seconds[i] ?? "").join(",");
  show(node, element, lines);
}

function setupVoice(node) {
  node.nfyVoiceReadout = addReadout(node, "nfy_voice_readout", 1);
  updateVoice(node);
}

// ---------------------------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------------------------
const NAME = "narrating_for_you.aids";
// ComfyUI serves the pack's js/ twice when both WEB_DIRECTORY and pyproject's [tool.comfy] web name it (under the
// folder name and the project name); the second copy must not register again (or add a second read-out).
if (!app.extensions?.some((e) => e.name === NAME)) app.registerExtension({
  name: NAME,
  setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.append(style);
    // The cheap catch-all, in the canvas and in the Vue-nodes mode alike (that one never calls onDrawForeground): a
    // voice source that changed without a callback is seen within a second (updateVoice returns at once when the
    // links and file names are unchanged), and a video preview is never muted.
    setInterval(() => {
      for (const node of app.graph?._nodes ?? []) {
        if (node.nfyVoiceReadout) updateVoice(node);
        if (VIDEO_NODES.has(node.comfyClass)) {
          for (const video of document.querySelectorAll(`[data-node-id="${node.id}"] video`)) video.muted = false;
          const video = node.videoContainer?.querySelector("video");
          if (video?.muted) video.muted = false;
        }
      }
    }, 1000);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData.name;
    const proto = nodeType.prototype;
    if (TEXT_NODES.has(name)) {
      after(proto, "onNodeCreated", function () { setupText(this); });
      after(proto, "onConfigure", function () { updateText(this); }); // a loaded workflow sets values silently
      after(proto, "onConnectionsChange", function () { updateText(this); });
    }
    if (VOICE_NODES.has(name)) {
      after(proto, "onNodeCreated", function () { setupVoice(this); });
      after(proto, "onConfigure", function () { updateVoice(this); });
      after(proto, "onConnectionsChange", function () { updateVoice(this); });
    }
  },
});
