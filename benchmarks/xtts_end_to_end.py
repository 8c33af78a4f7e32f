"""End-to-end XTTS-v2 speed on this machine: our pipeline against coqui-tts 0.28.0 on the same checkpoint and input.

    python benchmarks/xtts_end_to_end.py [--repeats 2] [--codes 215] [--out benchmarks/results/xtts_end_to_end.json]

What it does, all in one run:
1. Builds the full-size XTTS-v2 (`XttsConfig.v2()`, text vocabulary sized to the fixture `bpe_vocab.json` as coqui's
   loader derives it) with seeded random weights and saves it once in the real checkpoint layout: `model.pth` =
   {"model": state dict} with upstream's 963 key names (weight-norm parametrization keys included), `config.json`
   in coqui's format, `vocab.json`. Random weights would stop at random points, so the stop code's output bias is
   lowered by 100 in the file: both implementations then speak exactly the requested number of codes (the JSON
   records whether a stop code appeared anyway).
2. Creates a virtual environment for the reference (`~/.cache/narrate-for-you/bench-coqui`): `pip install` of the
   exact REFERENCE_PINS (coqui-tts 0.28.0, transformers 5.23.0, spacy, six) under tests/constraints.txt. It shares
   this environment's packages through a .pth file, so both sides run the very same torch build (pip sees torch
   2.11.0 installed and does not fetch another); the pins are installed into the reference environment itself and
   come first on its sys.path, so they shadow this environment's versions (checked before every run). A reference
   that cannot be built or does not import the pinned versions ends the benchmark with a non-zero exit and the
   reason.
   coqui-tts refuses to import without `torchcodec` on torch >= 2.9; as the fixture generator did, a stub package
   stands in for it (no file is read through it: the voice clip is decoded with PyAV on both sides and handed to
   upstream's `get_conditioning_latents` in place of its `torchaudio.load`). spaCy is upstream's sentence splitter
   (`enable_text_splitting=True`), which coqui-tts does not install itself.
3. Runs the same input through both, interleaved, best of --repeats (other processes share this CPU; the load
   average is recorded around every run):
   ours: encode_voice -> tokenize -> synthesize (greedy) -> vocode, in this process;
   theirs: get_conditioning_latents -> Xtts.inference (greedy, same repetition penalty and max_new_tokens, the
   same text splitting) in a worker process of the reference environment (this file run with --coqui-worker).
   Two texts: one sentence of about 10 s of speech (--codes codes, one chunk, where batching cannot help) and a
   multi-sentence text split into several chunks with the same total number of codes.
4. Compares the codes; where they differ, both sides' raw logits are recorded step by step up to the first
   difference (the fixtures' tolerance is 1e-4).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("NFY_BENCH_CACHE", Path.home() / ".cache" / "narrate-for-you"))
VOICE_FILE = REPO.parent / "shared" / "media" / "videos" / "man.mp4"
VOCAB_FILE = REPO.parent / "shared" / "fixtures" / "xtts" / "bpe_vocab.json"
# The reference environment's exact pins. coqui-tts 0.28.0's generate needs transformers 5.23 (5.24 changed the
# cache API it calls); spacy is upstream's sentence splitter (not a coqui-tts dependency); six is imported by
# coqui-tts's text utilities but not declared.
REFERENCE_PINS = {"coqui-tts": "0.28.0", "transformers": "5.23.0", "spacy": "3.8.18", "six": "1.17.0"}
STOP_BIAS_DROP = 100.0
REPETITION_PENALTY = 10.0  # Xtts.inference's default
VOICE_ARGS = dict(length_s=6, chunk_s=6, max_ref_s=30)  # get_conditioning_latents' defaults (6 s, 6 s chunks, 30 s)
SINGLE_TEXT = ("The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp above the "
               "rocks, and watched the fishing boats find their way home through the dark and restless sea.")
MULTI_TEXT = (
    "The old lighthouse keeper climbed the narrow stairs every evening and lit the great lamp above the rocks. "
    "He watched the fishing boats find their way home through the dark and restless sea, counting every light. "
    "When the storms came in from the west, he stayed awake until morning and wrote down the wind in his book. "
    "His daughter brought him bread and soup on Sundays, and together they listened to the radio by the stove. "
    "Years later she kept the same book on her shelf, its pages full of weather, ships and quiet small joys. "
    "Every autumn she read it again and remembered the smell of salt, oil and paper in the little round room. "
    "The lighthouse has no keeper now; the lamp turns by itself, but people still climb the stairs to look out. "
    "On clear nights you can see the beam sweep across the water, patient and steady, just as it always did.")


# ----------------------------------------------------------------------------------------------------------------
# shared by both processes

def decode_voice(path: Path = VOICE_FILE) -> tuple[torch.Tensor, int]:
    """The clip's audio track with PyAV -> float32 [channels, samples], sample rate."""
    import av
    import numpy as np
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        rate = stream.rate
    pcm = np.concatenate(frames, axis=1) if frames[0].ndim == 2 else np.concatenate(frames)
    if pcm.dtype.kind == "i":
        pcm = pcm.astype(np.float32) / float(np.iinfo(pcm.dtype).max)
    return torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32)), rate


def load_average() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------------------------
# the reference worker (runs inside the coqui-tts environment)

def coqui_worker(ckpt_dir: Path) -> None:
    """Serve timing requests for coqui-tts's Xtts on stdin/stdout (one JSON object per line, answers prefixed)."""
    import TTS
    import TTS.tts.models.xtts as xtts_module
    import torchaudio
    import transformers
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    waveform, rate = decode_voice()

    def load_audio(_path, sampling_rate):  # upstream's load_audio with PyAV instead of torchaudio.load
        audio = waveform.mean(dim=0, keepdim=True) if waveform.shape[0] != 1 else waveform.clone()
        if rate != sampling_rate:
            audio = torchaudio.functional.resample(audio, rate, sampling_rate)
        return audio.clip_(-1, 1)

    xtts_module.load_audio = load_audio
    config = XttsConfig()
    config.load_json(str(ckpt_dir / "config.json"))
    model = Xtts(config)
    model.load_checkpoint(config, checkpoint_dir=str(ckpt_dir), eval=True)

    timings: dict[str, float] = {}
    captured: dict[str, list] = {"codes": [], "text_ids": []}

    def timed(name, fn, capture=None):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            if capture:
                capture(args, kwargs, out)
            return out
        return wrapper

    def keep_codes(_args, kwargs, out):
        captured["codes"].append(out[0].tolist() if torch.is_tensor(out) else out[0][0].tolist())
        captured["text_ids"].append(kwargs["text_inputs"][0].tolist())

    model.gpt.generate = timed("gpt_generate", model.gpt.generate, keep_codes)
    model.gpt.forward = timed("gpt_latent_pass", model.gpt.forward)
    model.hifigan_decoder.forward = timed("vocoder", model.hifigan_decoder.forward)

    def answer(obj):
        sys.stdout.write("@@" + json.dumps(obj) + "\n")
        sys.stdout.flush()

    from provenance import package_versions  # this file's folder is on sys.path (run as a script)
    answer({"ready": True, "coqui_tts": TTS.__version__, "transformers": transformers.__version__,
            "transformers_file": transformers.__file__, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "packages": package_versions(("coqui-tts", "transformers", "tokenizers", "huggingface-hub", "torch",
                                          "torchaudio", "spacy", "numpy"))})
    for line in sys.stdin:
        req = json.loads(line)
        timings.clear()
        captured["codes"].clear()
        captured["text_ids"].clear()
        load0 = load_average()
        with torch.inference_mode():
            t0 = time.perf_counter()
            cond, speaker = model.get_conditioning_latents(audio_path=str(VOICE_FILE), max_ref_length=30,
                                                           gpt_cond_len=6, gpt_cond_chunk_len=6)
            t1 = time.perf_counter()
            if req["kind"] == "logits":  # raw logits per step of one chunk, for a code mismatch report
                gen = model.gpt.generate(cond_latents=cond, text_inputs=torch.tensor([req["text_ids"]]),
                                         do_sample=False, repetition_penalty=req["repetition_penalty"],
                                         max_new_tokens=req["max_new_tokens"], output_logits=True,
                                         return_dict_in_generate=True)
                torch.save(torch.cat(gen[1].logits).float(), req["save_to"])  # gen: (codes, HF output)
                answer({"saved": req["save_to"]})
                continue
            out = model.inference(req["text"], "en", cond, speaker, do_sample=False,
                                  repetition_penalty=req["repetition_penalty"],
                                  max_new_tokens=req["max_new_tokens"],
                                  enable_text_splitting=req["split"])
            t2 = time.perf_counter()
        answer({"voice_s": t1 - t0, "inference_s": t2 - t1, "total_s": t2 - t0, **timings,
                "codes": list(captured["codes"]), "text_ids": list(captured["text_ids"]),
                "samples": int(out["wav"].shape[-1]), "load_before": load0, "load_after": load_average()})


# ----------------------------------------------------------------------------------------------------------------
# setup (runs in this environment)

def bench_config(folder: Path):
    """v2 sizes, text vocabulary from `folder`/vocab.json (what both loaders derive from it)."""
    from narrate_model.xtts.checkpoint import _vocab_overrides
    from narrate_model.xtts.config import XttsConfig
    cfg = XttsConfig.v2()
    overrides = _vocab_overrides(folder)
    if not overrides:
        raise RuntimeError(f"no vocabulary read from {folder / 'vocab.json'}")
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def coqui_config_json(cfg) -> dict:
    """coqui's config.json layout: `model_args` (XttsArgs names) + top-level inference presets."""
    args = ("gpt_layers", "gpt_n_model_channels", "gpt_n_heads", "gpt_max_audio_tokens", "gpt_max_text_tokens",
            "gpt_max_prompt_tokens", "gpt_number_text_tokens", "gpt_start_text_token", "gpt_stop_text_token",
            "gpt_num_audio_tokens", "gpt_start_audio_token", "gpt_stop_audio_token", "gpt_code_stride_len",
            "gpt_use_perceiver_resampler", "gpt_use_masking_gt_prompt_approach", "gpt_batch_size", "kv_cache",
            "input_sample_rate", "output_sample_rate", "output_hop_length", "decoder_input_dim", "d_vector_dim",
            "cond_d_vector_in_each_upsampling_layer")
    presets = ("temperature", "length_penalty", "repetition_penalty", "top_k", "top_p", "gpt_cond_len",
               "gpt_cond_chunk_len", "max_ref_len", "sound_norm_refs", "languages")
    return {"model": "xtts", "model_args": {k: getattr(cfg, k) for k in args},
            **{k: getattr(cfg, k) for k in presets}}


def ensure_checkpoint(seed: int) -> Path:
    folder = CACHE / f"bench-xtts-random-seed{seed}"
    if (folder / "model.pth").is_file() and (folder / "config.json").is_file():
        return folder
    from narrate_model.xtts.model import XttsModel
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_bytes(VOCAB_FILE.read_bytes())
    cfg = bench_config(folder)
    torch.manual_seed(seed)
    model = XttsModel(cfg).eval()  # weight norm still in parametrization form: the checkpoint's key names
    with torch.no_grad():
        model.gpt.mel_head.bias[cfg.gpt_stop_audio_token] -= STOP_BIAS_DROP
    tmp = folder / "model.pth.part"
    torch.save({"model": model.state_dict()}, tmp)
    tmp.replace(folder / "model.pth")
    (folder / "config.json").write_text(json.dumps(coqui_config_json(cfg), indent=1))
    return folder


def reference_failure(what: str, why: str) -> SystemExit:
    """The benchmark cannot build or run its reference: exit non-zero, saying what and why."""
    return SystemExit(f"xtts_end_to_end: cannot build the coqui-tts reference: {what}.\n{why}")


def installed_versions(python: Path, names) -> dict:
    """name -> (version, location) as the reference environment's interpreter sees them (None when absent)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try:\n"
            "        d = m.distribution(n); out[n] = [d.version, str(d.locate_file(''))]\n"
            "    except m.PackageNotFoundError:\n"
            "        out[n] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
    if done.returncode:
        raise reference_failure(f"{python} cannot list its packages", done.stderr[-2000:])
    return json.loads(done.stdout)


def ensure_coqui_env() -> Path:
    """The reference environment, built once: REFERENCE_PINS installed in its own site-packages.

    It sees this environment's packages through a .pth file so that pip finds our torch build installed and the
    reference runs on the very same torch. Entries of a .pth are appended to sys.path after the environment's own
    site-packages, so everything pinned here (installed into the reference environment by pip even when this
    environment has another version) shadows this environment's copy: transformers 5.24 of the main environment
    would crash coqui's generate (`'NoneType' object has no attribute 'get_seq_length'`)."""
    venv = CACHE / "bench-coqui"
    python = venv / "bin" / "python"
    marker = venv / "nfy-installed.txt"
    wanted = [f"{name}=={version}" for name, version in REFERENCE_PINS.items()]
    if not (marker.is_file() and marker.read_text().split() == wanted):
        if not python.is_file():
            base = getattr(sys, "_base_executable", sys.executable)
            made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
            if made.returncode:
                raise reference_failure(f"`{base} -m venv {venv}` failed", made.stderr[-2000:])
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        (Path(site) / "nfy-main-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        stub = Path(site) / "torchcodec"
        stub.mkdir(exist_ok=True)
        (stub / "__init__.py").write_text('"""Stub: coqui-tts refuses to import without torchcodec on torch >= 2.9; '
                                          'the benchmark does no audio file IO through it."""\n')
        print(f"installing the reference environment {venv}: {' '.join(wanted)}", flush=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c",
                              str(REPO / "tests" / "constraints.txt"), *wanted], capture_output=True, text=True)
        if pip.returncode:
            raise reference_failure(f"pip could not install {' '.join(wanted)} (PyPI unreachable, or the pins no "
                                    f"longer resolve with this torch)", (pip.stdout + pip.stderr)[-3000:])
        marker.write_text(" ".join(wanted) + "\n")
    found = installed_versions(python, REFERENCE_PINS)
    wrong = {n: found[n] for n, v in REFERENCE_PINS.items()
             if found[n] is None or found[n][0] != v or not found[n][1].startswith(str(venv))}
    if wrong:  # e.g. an older cache whose install was satisfied by the main environment's copy
        raise reference_failure(f"{venv} does not hold its own pinned {', '.join(wrong)}",
                                f"pinned {REFERENCE_PINS}, found (version, location) {wrong}; delete {venv} to "
                                "rebuild it")
    return python


class CoquiWorker:
    def __init__(self, python: Path, ckpt: Path):
        command = [str(python), str(Path(__file__).resolve()), "--coqui-worker", str(ckpt),
                   "--threads", str(torch.get_num_threads())]  # the same thread count on both sides
        self.proc = subprocess.Popen(command,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"coqui worker exited with {self.proc.wait()}")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# our side

class Ours:
    def __init__(self, ckpt: Path):
        from narrate_model.xtts.checkpoint import load_xtts
        from narrate_model.xtts.text import XttsTokenizer
        self.model, self.cfg = load_xtts(ckpt)
        self.tokenizer = XttsTokenizer(ckpt / "vocab.json")
        self.voice = decode_voice()

    def run(self, text: str, split: bool, max_new: int, batch_size: int | None = None) -> dict:
        from narrate_model.xtts.sampling import SamplingParams
        from narrate_model.xtts.speech import BATCH_SIZE, synthesize, vocode
        from narrate_model.xtts.text import tokenize
        from narrate_model.xtts.voice import encode_voice
        params = SamplingParams(do_sample=False, repetition_penalty=REPETITION_PENALTY, max_new_tokens=max_new)
        load0 = load_average()
        with torch.inference_mode():
            t0 = time.perf_counter()
            voice = encode_voice(self.model, [self.voice], **VOICE_ARGS)
            t1 = time.perf_counter()
            tokens = tokenize(self.tokenizer, text, "en", split=split)
            t2 = time.perf_counter()
            speech = synthesize(self.model, tokens, voice, params, batch_size=batch_size or BATCH_SIZE)
            t3 = time.perf_counter()
            audio = vocode(self.model, speech, voice)
            t4 = time.perf_counter()
        return {"voice_s": t1 - t0, "tokenize_s": t2 - t1, "gpt_generate": t3 - t2, "vocoder": t4 - t3,
                "total_s": t4 - t0, "codes": [c.codes[0].tolist() for c in speech.chunks], "text_ids": tokens.ids,
                "stopped": [c.stopped for c in speech.chunks], "samples": int(audio["waveform"].shape[-1]),
                "load_before": load0, "load_after": load_average()}


def summarise(run: dict, sample_rate: int) -> dict:
    codes = sum(len(c) for c in run["codes"])
    seconds = run["samples"] / sample_rate
    out = {"codes": codes, "chunks": len(run["codes"]), "audio_s": round(seconds, 3),
           "s_per_code": run["gpt_generate"] / codes, "vocoder_rtf": run["vocoder"] / seconds,
           "end_to_end_s": run["total_s"], "end_to_end_rtf": run["total_s"] / seconds,
           "voice_encode_s": run["voice_s"], "gpt_generate_s": run["gpt_generate"], "vocoder_s": run["vocoder"],
           "load_avg_1min": [run["load_before"], run["load_after"]]}
    if "gpt_latent_pass" in run:
        out["gpt_latent_pass_s"] = run["gpt_latent_pass"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def logit_gaps(ours: Ours, worker: CoquiWorker, text_ids: list, steps: int, work: Path) -> torch.Tensor:
    """max |raw logit ours - theirs| at each of the first `steps` greedy steps of one chunk (untimed)."""
    from narrate_model.xtts.sampling import SamplingParams
    from narrate_model.xtts.voice import encode_voice
    path = work / "their_logits.pt"
    worker.ask(kind="logits", text_ids=text_ids, repetition_penalty=REPETITION_PENALTY, max_new_tokens=steps,
               save_to=str(path))
    theirs = torch.load(path, weights_only=True)
    params = SamplingParams(do_sample=False, repetition_penalty=REPETITION_PENALTY, max_new_tokens=steps)
    with torch.inference_mode():
        voice = encode_voice(ours.model, [ours.voice], **VOICE_ARGS)
        mine = ours.model.gpt.generate(torch.tensor([text_ids]), voice.gpt_cond_latent, params, record_scores=True)
    n = min(len(theirs), len(mine.step_logits))
    return (mine.step_logits[:n] - theirs[:n]).abs().amax(dim=1)


def compare_codes(ours_codes, their_codes, ours: Ours, worker: CoquiWorker, text_ids, max_new, work: Path) -> dict:
    """Identical codes or the first differing step, and the raw-logit gap at every step of the first differing chunk
    up to that step (of chunk 0 over all steps when every code agrees)."""
    differing = [i for i, (a, b) in enumerate(zip(ours_codes, their_codes)) if a != b]
    report = {"identical": not differing and len(ours_codes) == len(their_codes)}
    chunk = differing[0] if differing else 0
    a, b = ours_codes[chunk], their_codes[chunk]
    first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) if differing else None
    gaps = logit_gaps(ours, worker, text_ids[chunk], max_new if first is None else first + 1, work)
    report.update({"checked_chunk": chunk, "first_differing_step": first, "steps_checked": len(gaps),
                   "max_abs_logit_diff": float(gaps.max()), "within_1e-4": bool(gaps.max() <= 1e-4),
                   "max_abs_logit_diff_per_step": [float(f"{g:.3g}") for g in gaps.tolist()]})
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=215, help="codes per text (about 10 s of speech at 21.5 codes/s)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per implementation and text (best kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "xtts_end_to_end.json")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both implementations (0: torch's default)")
    ap.add_argument("--coqui-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.coqui_worker:
        coqui_worker(args.coqui_worker)
        return
    sys.path.insert(0, str(REPO))  # run from anywhere: the repo root holds narrate_model
    from provenance import environment
    from narrate_model.xtts.speech import BATCH_SIZE
    from narrate_model.xtts.text import XttsTokenizer, tokenize

    ckpt = ensure_checkpoint(args.seed)
    python = ensure_coqui_env()
    print(f"checkpoint {ckpt}\nreference env {python.parent.parent}", flush=True)
    worker = CoquiWorker(python, ckpt)
    ran = {"coqui-tts": worker.info["coqui_tts"], "transformers": worker.info["transformers"]}
    if any(ran[n] != REFERENCE_PINS[n] for n in ran):
        raise reference_failure(f"the reference imported {ran}, not the pinned versions",
                                f"transformers came from {worker.info['transformers_file']}; delete "
                                f"{python.parent.parent} to rebuild the environment")
    ours = Ours(ckpt)
    rate = ours.cfg.output_sample_rate

    n_multi = len(tokenize(ours.tokenizer, MULTI_TEXT, "en", split=True).ids)
    cases = {"single_sentence": (SINGLE_TEXT, False, args.codes),
             "multi_sentence": (MULTI_TEXT, True, math.ceil(args.codes / n_multi))}
    # warm-up (first calls allocate and pick kernels), not timed
    ours.run(SINGLE_TEXT, False, 3)
    worker.ask(kind="inference", text=SINGLE_TEXT, split=False, repetition_penalty=REPETITION_PENALTY,
               max_new_tokens=3)

    results = {}
    for name, (text, split, max_new) in cases.items():
        # several chunks: ours also one chunk after another (batch_size=1), to show what batching contributes
        sides = ("ours", "coqui_tts") + (("ours_one_by_one",) if split else ())
        runs = {side: [] for side in sides}
        for rep in range(args.repeats):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                if side.startswith("ours"):
                    runs[side].append(ours.run(text, split, max_new, 1 if side == "ours_one_by_one" else None))
                else:
                    runs[side].append(worker.ask(kind="inference", text=text, split=split,
                                                 repetition_penalty=REPETITION_PENALTY, max_new_tokens=max_new))
                print(f"{name} {side} run {rep + 1}: {runs[side][-1]['total_s']:.1f} s "
                      f"(load {runs[side][-1]['load_before']:.1f})", flush=True)
        best = {side: min(r, key=lambda x: x["total_s"]) for side, r in runs.items()}
        mine, theirs = best["ours"], best["coqui_tts"]
        summary = {side: summarise(best[side], rate) for side in best}
        for side in summary:
            summary[side]["all_runs_end_to_end_s"] = [round(r["total_s"], 3) for r in runs[side]]
        their_stops = [1025 in c for c in theirs["codes"]]
        summary["ours"]["stop_token_seen"] = any(mine["stopped"])
        summary["coqui_tts"]["stop_token_seen"] = any(their_stops)
        results[name] = {
            "text": text, "enable_text_splitting": split, "max_new_tokens_per_chunk": max_new,
            "chunks": len(mine["codes"]), "same_text_ids": mine["text_ids"] == theirs["text_ids"],
            **summary,
            "speed_up_end_to_end": round(theirs["total_s"] / mine["total_s"], 3),
            "speed_up_per_code": round(summary["coqui_tts"]["s_per_code"] / summary["ours"]["s_per_code"], 3),
            "meets_2x_end_to_end": theirs["total_s"] / mine["total_s"] >= 2.0,
            "codes": compare_codes(mine["codes"], theirs["codes"], ours, worker, mine["text_ids"], max_new, ckpt),
        }
        if "ours_one_by_one" in best:
            one = best["ours_one_by_one"]
            results[name]["ours_one_by_one"]["codes_equal_batched"] = one["codes"] == mine["codes"]
            results[name]["speed_up_end_to_end_one_by_one"] = round(theirs["total_s"] / one["total_s"], 3)
    worker.close()

    verdict = {name: ("meets" if r["meets_2x_end_to_end"] else "does NOT meet")
               + f" the 2x target end to end ({r['speed_up_end_to_end']:.2f}x)" for name, r in results.items()}
    report = {
        "what": "XTTS-v2 full size, seeded random weights, greedy decoding, CPU; best of --repeats interleaved runs",
        "verdict": verdict,
        "notes": [
            "One sentence: a decode step reads every GPT weight (~1.5 GB fp32) on both sides, so the per-code cost "
            "is bound by memory bandwidth for both; ours saves upstream's second teacher-forced GPT pass (latents "
            "are kept while generating) and some per-step overhead, and voices with folded weight norm. Without "
            "lower precision (which changes the codes) this case cannot reach 2x on this CPU.",
            "Several chunks: ours generates up to speech.BATCH_SIZE chunks in one batched KV-cached pass (weights "
            "read once per step for all of them); upstream generates them one after another, each with its own "
            "prefill and second pass.",
            "Both sides run with the same torch thread count (machine.torch_threads). The 2 cores of this machine "
            "are shared with other jobs; see load_avg_1min per run.",
            f"The stop code's bias is lowered by {STOP_BIAS_DROP:g} in the checkpoint so random weights speak "
            "exactly max_new_tokens codes per chunk on both sides.",
        ],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "reference": worker.info, "reference_pins": REFERENCE_PINS, "ours": environment(), "note": "shared machine: other processes ran during the measurement; "
                                                      "see load_avg_1min per run"},
        "settings": {"repetition_penalty": REPETITION_PENALTY, "voice": str(VOICE_FILE), **VOICE_ARGS,
                     "ours_batch_size": BATCH_SIZE, "stop_bias_lowered_by": STOP_BIAS_DROP, "seed": args.seed},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{'case':16} {'side':15} {'codes':>5} {'s/code':>7} {'voc RTF':>7} {'e2e s':>7} {'e2e RTF':>7}")
    for name, r in results.items():
        for side in ("ours", "ours_one_by_one", "coqui_tts"):
            if side not in r:
                continue
            s = r[side]
            print(f"{name:16} {side:15} {s['codes']:>5} {s['s_per_code']:>7.3f} {s['vocoder_rtf']:>7.2f} "
                  f"{s['end_to_end_s']:>7.1f} {s['end_to_end_rtf']:>7.2f}")
        print(f"{'':16} speed-up end to end {r['speed_up_end_to_end']:.2f}x, per code {r['speed_up_per_code']:.2f}x,"
              f" codes identical: {r['codes']['identical']}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
