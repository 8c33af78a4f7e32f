"""Hallo sampler benchmark: seconds per frame (full size on a GPU, a reduced Net per step on the CPU) and peak
memory against video length.

    python benchmarks/hallo_sampler.py                        # CPU: reduced speed + memory vs length
    python benchmarks/hallo_sampler.py --device cuda --full   # GPU: also the full-size 512x512 figure (fp16)
    python benchmarks/hallo_sampler.py --only full --device cuda --full   # just that, merged into the results file
    python benchmarks/hallo_sampler.py --only kv_cache         # the K/V cache ratio on this machine (~2-4 min)

Sections of benchmarks/results/hallo_sampler.json (a run replaces the sections it ran, keeps the others):
  full     512x512, 40 DDIM steps, CFG 3.5, 16-frame clips, 2 motion frames, the full Net (2.4 G parameters) and an
           SD1.5-architecture VAE, random weights, fp16 as Hallo runs; seconds per output frame measured end to end
           (sample_video + VAE decode of every frame), next to Hallo's published 1.63 s/frame (A100). Needs cuda:
           initialising the full Net on the CPU alone takes ~10 GB and minutes.
  reduced  the full layout with narrower blocks (see the recorded config): one ReferenceNet pass and a few measured
           denoising steps (both CFG halves, batch 2 x 16 frames); 40 steps per clip are extrapolated from them.
  kv_cache the reduced Net's denoising step with the reference K/V cache on and off (SamplerSettings
           .reference_kv_cache), alternating in one process: the per-step ratio
  memory   peak RSS of a fresh process running sample_video for 1, 2, 4, 8 clips with the tiny fixture Net + VAE and
           realistic face inputs (man.jpg through encode_face); the ratio peak(8 clips) / peak(1 clip).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo root holds narrate_model
from narrate_model.hallo.checkpoint import load_hallo
from narrate_model.hallo.net import AudioProjConfig, FaceLocatorConfig, HalloConfig, ImageProjConfig, build_net
from narrate_model.hallo.reference import write_banks
from narrate_model.hallo.sampler import (ClipConditioning, FaceInputs, SamplerSettings, _clip_audio_tokens,
                                         denoise_clip, diffusers_vae_callables, make_scheduler, sample_video)
from narrate_model.hallo.unet import UNet3DConfig

sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402

SHARED = REPO.parent / "shared"
HALLO_FIXTURES = SHARED / "fixtures" / "hallo"
PORTRAIT = SHARED / "media" / "images" / "man.jpg"
RESULTS = REPO / "benchmarks" / "results" / "hallo_sampler.json"
HALLO_PUBLISHED = {"seconds_per_frame": 1.63, "gpu": "A100", "size": 512, "peak_gpu_memory_gb": 9.77,
                   "source": "Hallo paper, Table 7 (quoted in fudan-generative-vision/hallo#28)"}
# Hallo's video settings (configs/inference/default.yaml)
FULL_SIZE, STEPS, CFG, CLIP_LENGTH, MOTION_FRAMES = 512, 40, 3.5, 16, 2

# SD1.5's block layout and head count, narrowed so that one step of 2 x 16 frames runs in seconds on 2 CPU cores
REDUCED = HalloConfig(
    unet=UNet3DConfig(block_out_channels=(64, 128, 256, 256), layers_per_block=1, cross_attention_dim=128,
                      audio_attention_dim=128),
    face_locator=FaceLocatorConfig(conditioning_embedding_channels=64),
    imageproj=ImageProjConfig(cross_attention_dim=128),
    audioproj=AudioProjConfig(output_dim=128))


# ---------------------------------------------------------------------------------------------------------- inputs
def sd_vae(device: str, dtype: torch.dtype):
    """sd-vae-ft-mse's architecture (what Hallo decodes with), randomly initialised."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, sample_size=512)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    config = json.loads((HALLO_FIXTURES / "tiny_config.json").read_text())["tiny_vae"]["config"]
    vae = AutoencoderKL(**config)
    vae.load_state_dict(load_file(str(HALLO_FIXTURES / "tiny_vae.safetensors")))
    return vae.eval()


def landmarker_path() -> str:
    """MediaPipe's face_landmarker.task, where tests/install.sh put it (NFY_FACE_LANDMARKER wins)."""
    if os.environ.get("NFY_FACE_LANDMARKER"):
        return os.environ["NFY_FACE_LANDMARKER"]
    env_file = REPO / ".venv" / "nfy-test.env"
    for line in env_file.read_text().splitlines() if env_file.exists() else []:
        key, _, value = line.partition("=")
        if key == "NFY_FACE_LANDMARKER":
            return value
    raise SystemExit("no face_landmarker.task: run tests/install.sh or set NFY_FACE_LANDMARKER")


def portrait_face(size: int) -> tuple[FaceInputs, torch.Tensor]:
    """Face inputs for the sampler at `size` pixels and the portrait image [1, size, size, 3] (the VAE's input),
    from man.jpg. No identity model is loaded, so the face embedding is Hallo's no-face fallback (zeros)."""
    from narrate_model.hallo.face import encode_face

    image = torch.from_numpy(np.asarray(Image.open(PORTRAIT).convert("RGB")).copy()).float().div(255)
    encoding = encode_face(image, landmarker_path())
    return encoding.sampler_inputs(size), encoding.image(size)


def audio_windows(config: HalloConfig, frames: int, seed: int = 0) -> torch.Tensor:
    """Random wav2vec windows [frames, seq_len, blocks, channels] (values do not change the cost)."""
    ap = config.audioproj
    return torch.randn(frames, ap.seq_len, ap.blocks, ap.channels, generator=torch.Generator().manual_seed(seed))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------- full
def bench_full(device: str, clips: int) -> dict:
    """End to end at Hallo's settings: sample_video over `clips` clips + VAE decode of every frame, fp16."""
    dtype, size = torch.float16, FULL_SIZE
    face, image = portrait_face(size)
    t0 = time.perf_counter()
    net = build_net(HalloConfig(), device=device).half()  # random init in place on the GPU, then fp16 as Hallo
    vae = sd_vae(device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    encode, decode = diffusers_vae_callables(vae)
    with torch.no_grad():
        ref_latents = encode(image).float()
    frames = clips * CLIP_LENGTH

    def run(settings: SamplerSettings, n_frames: int) -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        latents = sample_video(net, face, audio_windows(HalloConfig(), n_frames), ref_latents, settings,
                               vae_encode=encode, vae_decode=decode)
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            for clip in latents.split(CLIP_LENGTH):  # decode 16 frames at a time
                decode(clip)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    run(SamplerSettings(steps=2, cfg=CFG, clip_length=CLIP_LENGTH, motion_frames=MOTION_FRAMES), CLIP_LENGTH + 1)
    torch.cuda.reset_peak_memory_stats()
    settings = SamplerSettings(steps=STEPS, cfg=CFG, clip_length=CLIP_LENGTH, motion_frames=MOTION_FRAMES)
    sampling_s, decode_s = run(settings, frames)
    return {
        "measured": True,
        "device": torch.cuda.get_device_name(), "dtype": "float16", "size": size, "steps": STEPS, "cfg": CFG,
        "clip_length": CLIP_LENGTH, "motion_frames": MOTION_FRAMES, "clips": clips, "frames": frames,
        "weights": "random (PyTorch default init)", "net_parameters": parameters(net),
        "vae": "sd-vae-ft-mse architecture, random weights",
        "build_s": round(build_s, 2),
        "sampling_s": round(sampling_s, 2), "vae_decode_s": round(decode_s, 2),
        "seconds_per_frame": round((sampling_s + decode_s) / frames, 4),
        "sampling_seconds_per_frame": round(sampling_s / frames, 4),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "hallo_published": HALLO_PUBLISHED,
        "note": "seconds_per_frame = (sample_video incl. ReferenceNet passes and motion-frame re-encoding + VAE "
                "decode of every frame) / frames; measured, not extrapolated; a 2-step warm-up run precedes it",
    }


def full_not_measured(device: str) -> dict:
    if device.startswith("cuda"):
        why = "not requested: run with --device cuda --full"
    else:
        why = (f"no GPU was available to this run (device {device}). The full-size Net has 2.4 G parameters (~10 GB "
               "to initialise in fp32), and one 16-frame denoising-UNet forward at 512x512 was measured at 202 s warm "
               "on this machine's 2 cores (upstream_models.md B10), ~400 s per CFG step, ~4.5 h per clip: the figure "
               "is only taken with --device cuda --full")
    return {"measured": False, "why": why, "settings": {"size": FULL_SIZE, "steps": STEPS, "cfg": CFG,
                                                        "clip_length": CLIP_LENGTH, "motion_frames": MOTION_FRAMES,
                                                        "dtype": "float16"},
            "hallo_published": HALLO_PUBLISHED}


# ---------------------------------------------------------------------------------------------------------- reduced
def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_reduced(device: str, size: int, measured_steps: int) -> dict:
    """Per-step cost of the reduced Net; 40 steps per clip extrapolated from `measured_steps` measured steps."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    face, image = portrait_face(size)
    net = build_net(REDUCED, device=device).to(dtype)
    vae = sd_vae(device, dtype)
    encode, decode = diffusers_vae_callables(vae)
    scale = net.config.latent_scale
    with torch.no_grad():
        ref_latents = encode(image).float()
        reference = ref_latents.to(device) * scale
        ref_and_motion = torch.cat([reference, reference, reference])
        cond = ClipConditioning(net, face, CLIP_LENGTH, cfg=True)
        tokens = _clip_audio_tokens(net, audio_windows(REDUCED, CLIP_LENGTH), cfg=True)
        banks_s = [timed(lambda: write_banks(net.reference_unet, ref_and_motion, cond.face_tokens), device)
                   for _ in range(2)]
        marks = []

        def mark():
            sync(device)
            marks.append(time.perf_counter())
        settings = SamplerSettings(steps=measured_steps + 1, cfg=CFG, clip_length=CLIP_LENGTH,
                                   motion_frames=MOTION_FRAMES)
        # step 1 (with the ReferenceNet pass and the noise) is the warm-up; the intervals after it are the steps
        denoise_clip(net, make_scheduler(), torch.Generator().manual_seed(0), cond, tokens, ref_and_motion,
                     settings, on_step=mark)
        step_s = [b - a for a, b in itertools.pairwise(marks)]
        latents = torch.randn(CLIP_LENGTH, 4, size // 8, size // 8, device=device)
        decode(latents[:2])  # warm-up
        decode_2_s = timed(lambda: decode(latents[:2]), device)
        reencode_s = timed(lambda: encode(decode(latents[:MOTION_FRAMES])), device)

    ref_s, step = min(banks_s), statistics.median(step_s)
    decode_per_frame = decode_2_s / 2
    per_clip = ref_s + STEPS * step + reencode_s + CLIP_LENGTH * decode_per_frame
    u = REDUCED.unet
    return {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "config": {"block_out_channels": list(u.block_out_channels), "layers_per_block": u.layers_per_block,
                   "attention_heads": u.attention_heads, "cross_attention_dim": u.cross_attention_dim,
                   "audio_attention_dim": u.audio_attention_dim, "norm_num_groups": u.norm_num_groups,
                   "motion_module": vars(u.motion), "face_locator": vars(REDUCED.face_locator),
                   "imageproj": vars(REDUCED.imageproj), "audioproj": vars(REDUCED.audioproj),
                   "net_parameters": parameters(net), "weights": "random (PyTorch default init)"},
        "video": {"size": size, "latent_size": size // 8, "frames_per_clip": CLIP_LENGTH,
                  "motion_frames": MOTION_FRAMES, "cfg": CFG, "unet_batch": 2 * CLIP_LENGTH,
                  "reference_batch": 2 * (1 + MOTION_FRAMES)},
        "vae": "sd-vae-ft-mse architecture (not reduced), random weights",
        "measured": {
            "denoising_step_s": [round(s, 3) for s in step_s],
            "denoising_step_median_s": round(step, 3),
            "reference_pass_s": round(ref_s, 3),
            "vae_decode_per_frame_s": round(decode_per_frame, 3),
            "motion_reencode_s": round(reencode_s, 3),
        },
        "extrapolated": {
            "steps": STEPS,
            "seconds_per_clip": round(per_clip, 2),
            "seconds_per_frame": round(per_clip / CLIP_LENGTH, 3),
            "unet_seconds_per_frame": round((ref_s + STEPS * step) / CLIP_LENGTH, 3),
            "formula": "per clip = reference pass + 40 x median step + motion re-encode (decode+encode of 2 frames) "
                       "+ 16 x VAE decode per frame; per frame = per clip / 16. Extrapolated from "
                       f"{len(step_s)} measured steps, not a 40-step run",
        },
    }


# ---------------------------------------------------------------------------------------------------------- kv_cache
def bench_kv_cache(device: str, size: int, measured_steps: int, repeats: int) -> dict:
    """The reduced Net's denoising step with the reference K/V projected once per clip (the default) and at every
    step (`SamplerSettings.reference_kv_cache=False`), in one process, the two alternating so that a change in the
    machine's load hits both."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    load_before = round(os.getloadavg()[0], 2)
    torch.manual_seed(0)
    face, image = portrait_face(size)
    net = build_net(REDUCED, device=device).to(dtype)
    net.denoising_unet.drop_skipped_motion_modules()  # as load_hallo does
    encode, _ = diffusers_vae_callables(sd_vae(device, dtype))
    steps = {False: [], True: []}
    cpu_steps = {False: [], True: []}  # process CPU seconds: less swayed than wall time by other jobs on the machine
    with torch.no_grad():
        reference = encode(image).float().to(device) * net.config.latent_scale
        ref_and_motion = torch.cat([reference] * (1 + MOTION_FRAMES))
        cond = ClipConditioning(net, face, CLIP_LENGTH, cfg=True)
        tokens = _clip_audio_tokens(net, audio_windows(REDUCED, CLIP_LENGTH), cfg=True)
        for repeat in range(repeats):
            for cached in ((False, True) if repeat % 2 else (True, False)):  # the order alternates too
                marks, cpu_marks = [], []

                def mark():
                    sync(device)
                    marks.append(time.perf_counter())
                    cpu_marks.append(time.process_time())
                settings = SamplerSettings(steps=measured_steps + 1, cfg=CFG, clip_length=CLIP_LENGTH,
                                           motion_frames=MOTION_FRAMES, reference_kv_cache=cached)
                # the intervals between step ends: the ReferenceNet pass and the K/V projection come before step 1
                denoise_clip(net, make_scheduler(), torch.Generator().manual_seed(0), cond, tokens, ref_and_motion,
                             settings, on_step=mark)
                steps[cached] += [b - a for a, b in itertools.pairwise(marks)]
                cpu_steps[cached] += [b - a for a, b in itertools.pairwise(cpu_marks)]
    flops = {name: step_flops(config, FULL_SIZE if name == "full" else size) for name, config in
             (("full", HalloConfig()), ("reduced", REDUCED))}
    # the fastest step of each setting: the one least disturbed by other jobs on a shared machine
    uncached, cached = min(steps[False]), min(steps[True])
    uncached_cpu, cached_cpu = min(cpu_steps[False]), min(cpu_steps[True])
    return {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "net": "the reduced Net of the 'reduced' section (random weights), skipped motion modules dropped",
        "video": {"size": size, "frames_per_clip": CLIP_LENGTH, "cfg": CFG, "unet_batch": 2 * CLIP_LENGTH},
        "uncached_step_s": [round(x, 3) for x in steps[False]],
        "cached_step_s": [round(x, 3) for x in steps[True]],
        "uncached_step_median_s": round(statistics.median(steps[False]), 3),
        "cached_step_median_s": round(statistics.median(steps[True]), 3),
        "uncached_step_min_s": round(uncached, 3), "cached_step_min_s": round(cached, 3),
        "speedup_uncached_over_cached": round(uncached / cached, 3),
        "uncached_step_cpu_s": [round(x, 3) for x in cpu_steps[False]],
        "cached_step_cpu_s": [round(x, 3) for x in cpu_steps[True]],
        "cpu_time_speedup_uncached_over_cached": round(uncached_cpu / cached_cpu, 3),
        "load_average_1m_before": load_before,
        "flops_per_step": flops,
        "note": "per-step wall time of denoise_clip (both CFG halves, 16 frames); the speedups compare each "
                "setting's fastest step (the least disturbed by other jobs on this shared CPU); the two settings "
                "alternate within one process, in alternating order. flops_per_step counts the arithmetic on the "
                "meta device, independent of the machine",
    }


def step_flops(config: HalloConfig, size: int) -> dict:
    """Floating-point operations of one CFG denoising step (16 frames), counted on the meta device (no arithmetic,
    independent of the machine's load), with the reference K/V projected in the step and read from the cache."""
    from torch.utils.flop_counter import FlopCounterMode

    from vram_estimate import clip_step

    net = build_net(config, device="meta").half()
    net.denoising_unet.drop_skipped_motion_modules()
    counted = {}
    with torch.no_grad():
        for cached in (False, True):
            prepare, step = clip_step(net, size, cached=cached)
            state = prepare()
            with FlopCounterMode(display=False) as counter:
                step(*state)
            counted[cached] = counter.get_total_flops()
    return {"size": size, "uncached": counted[False], "cached": counted[True],
            "saved_fraction": round(1 - counted[True] / counted[False], 5)}


# ---------------------------------------------------------------------------------------------------------- memory
def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(clips: int, inputs: Path, net_path: Path, steps: int) -> dict:
    """In a fresh process: sample_video over `clips` clips; peak RSS (VmHWM) before and after, RSS after every clip.

    Not ru_maxrss: Linux carries the parent's peak over fork + exec into the child's ru_maxrss (a 2 GB parent made
    every child report 2 GB), while VmHWM belongs to this process image alone."""
    torch.manual_seed(0)
    data = load_file(str(inputs))
    face = FaceInputs(data["embedding"], data["region"], *[[data[f"{name}_{level}"] for level in range(4)]
                                                            for name in ("full", "face", "lip")])
    net = load_hallo(net_path)
    encode, decode = diffusers_vae_callables(tiny_vae())
    with torch.no_grad():
        ref_latents = encode(data["image"])
    audio = audio_windows(net.config, clips * CLIP_LENGTH, seed=clips)
    settings = SamplerSettings(steps=steps, cfg=CFG, clip_length=CLIP_LENGTH, motion_frames=MOTION_FRAMES)
    peak_before, rss_before = status_kb("VmHWM"), status_kb("VmRSS")
    rss_after_clip = []

    def progress(done: int, total: int) -> None:
        if done % steps == 0:
            rss_after_clip.append(status_kb("VmRSS"))
    latents = sample_video(net, face, audio, ref_latents, settings, vae_encode=encode, vae_decode=decode,
                           progress=progress)
    return {"clips": clips, "frames": latents.shape[0], "latents_bytes": latents.numel() * latents.element_size(),
            "rss_before_sampling_kb": rss_before, "peak_rss_before_sampling_kb": peak_before,
            "peak_rss_kb": status_kb("VmHWM"), "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "rss_after_each_clip_kb": rss_after_clip}


def bench_memory(lengths: list[int], size: int, steps: int) -> dict:
    face, image = portrait_face(size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # load_hallo reads a reduced layout from `<weights>.json` beside the weights (the Load Hallo node's layout)
        (tmp / "tiny.safetensors").symlink_to(HALLO_FIXTURES / "tiny_net.safetensors")
        (tmp / "tiny.json").symlink_to(HALLO_FIXTURES / "tiny_config.json")
        tensors = {"embedding": face.embedding, "region": face.region, "image": image}
        for name in ("full", "face", "lip"):
            tensors.update({f"{name}_{i}": m for i, m in enumerate(getattr(face, f"{name}_masks"))})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "inputs.safetensors"))
        runs = []
        for clips in lengths:
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(clips), "--memory-inputs",
                                  str(tmp / "inputs.safetensors"), "--memory-net", str(tmp / "tiny.safetensors"),
                                  "--memory-steps", str(steps)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {clips} clip(s): peak RSS {runs[-1]['peak_rss_kb'] / 1024:.1f} MiB", file=sys.stderr)
    peak = {r["clips"]: r["peak_rss_kb"] for r in runs}
    first, last = min(peak), max(peak)
    ratio = peak[last] / peak[first]
    above = {r["clips"]: r["peak_rss_kb"] - r["rss_before_sampling_kb"] for r in runs}
    return {
        "measure": "peak RSS (KiB) = /proc/self/status VmHWM of a fresh Python process per length (ru_maxrss is "
                   "recorded too but is not used: Linux carries the parent's peak over fork + exec into it); "
                   "'peak_rss_before_sampling_kb' is the same figure after imports and loading, before sample_video; "
                   "'rss_before_sampling_kb' and 'rss_after_each_clip_kb' are /proc/self/status VmRSS then and "
                   "after each clip's last step; 'sampling_peak_ratio' compares peak_rss_kb - rss_before_sampling_kb",
        "net": "tiny fixture Net (tiny_net.safetensors + tiny_config.json via load_hallo) + tiny fixture VAE, fp32",
        "inputs": f"man.jpg through encode_face, sampler_inputs({size}) (no identity model: zero embedding); "
                  "random wav2vec windows, one per frame",
        "size": size, "steps": steps, "cfg": CFG, "clip_length": CLIP_LENGTH, "motion_frames": MOTION_FRAMES,
        "threads": torch.get_num_threads(),
        "runs": runs,
        f"peak_ratio_{last}_over_{first}": round(ratio, 4),
        f"sampling_peak_ratio_{last}_over_{first}": round(above[last] / above[first], 4),
        "within_10_percent": ratio <= 1.10,
    }


# ---------------------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    rows = []
    full = results.get("full")
    if full:
        published = f"{HALLO_PUBLISHED['seconds_per_frame']} s/frame ({HALLO_PUBLISHED['gpu']}, Hallo paper)"
        if full.get("measured"):
            rows.append(("full 512x512, 40 steps, fp16", (f"{full['seconds_per_frame']} s/frame on {full['device']} "
                         f"(measured, {full['frames']} frames; peak {full['peak_gpu_memory_gb']} GB)")))
        else:
            rows.append(("full 512x512, 40 steps, fp16", f"not measured: {full['why'].split('.')[0]}"))
        rows.append(("  Hallo published", published))
    red = results.get("reduced")
    if red:
        m, e, v = red["measured"], red["extrapolated"], red["video"]
        where = f"{red['device']} {red['dtype']}, {red['threads']} threads"
        rows += [
            (f"reduced {red['config']['block_out_channels']} x{red['config']['layers_per_block']}, {v['size']}px",
             where),
            ("  denoising step (CFG, 2x16 frames)",
             f"{m['denoising_step_median_s']} s (median of {m['denoising_step_s']})"),
            ("  ReferenceNet pass per clip", f"{m['reference_pass_s']} s"),
            ("  VAE decode per frame", f"{m['vae_decode_per_frame_s']} s"),
            ("  per frame, 40 steps", (f"{e['seconds_per_frame']} s (extrapolated; ReferenceNet + UNet alone "
                                       f"{e['unet_seconds_per_frame']} s)")),
        ]
    kv = results.get("kv_cache")
    if kv:
        rows += [(f"K/V cache, reduced Net {kv['video']['size']}px ({kv['device']} {kv['dtype']})",
                  f"fastest step {kv['uncached_step_min_s']} s uncached -> {kv['cached_step_min_s']} s cached "
                  f"(x{kv['speedup_uncached_over_cached']}; CPU time x{kv['cpu_time_speedup_uncached_over_cached']})"),
                 ("  FLOPs saved per step (full 512px / reduced)",
                  f"{kv['flops_per_step']['full']['saved_fraction']:.2%} / "
                  f"{kv['flops_per_step']['reduced']['saved_fraction']:.2%}")]
    mem = results.get("memory")
    if mem:
        ratio_key = next(k for k in mem if k.startswith("peak_ratio_"))
        for run in mem["runs"]:
            rows.append((f"peak RSS, {run['clips']} clip(s) ({run['frames']} frames)",
                         f"{run['peak_rss_kb'] / 1024:.1f} MiB"))
        rows.append((f"  {ratio_key}", f"{mem[ratio_key]} ({'within' if mem['within_10_percent'] else 'over'} 10%)"))
        sampling_key = "sampling_" + ratio_key
        rows.append((f"  {sampling_key}", f"{mem[sampling_key]} (peak above the RSS before sample_video)"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def environment() -> dict:
    return {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1m_after": round(os.getloadavg()[0], 2),  # the CPU may be shared with other jobs
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--full", action="store_true", help="also measure the full-size Net end to end (needs cuda)")
    ap.add_argument("--full-clips", type=int, default=2, help="clips of the full-size run (16 frames each)")
    ap.add_argument("--only", choices=("full", "reduced", "memory", "kv_cache"), action="append",
                    help="run only these sections (repeatable)")
    ap.add_argument("--reduced-size", type=int, default=256, help="video size of the reduced run (pixels)")
    ap.add_argument("--reduced-steps", type=int, default=3, help="denoising steps measured (after a warm-up step)")
    ap.add_argument("--kv-size", type=int, default=128, help="video size of the K/V cache comparison (pixels)")
    ap.add_argument("--kv-steps", type=int, default=2, help="steps measured per run of the K/V cache comparison")
    ap.add_argument("--kv-repeats", type=int, default=4, help="runs of each setting in the K/V cache comparison")
    ap.add_argument("--memory-clips", default="1,2,4,8")
    ap.add_argument("--memory-size", type=int, default=256, help="video size of the memory runs (pixels)")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory-inputs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--memory-net", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_inputs, args.memory_net, args.memory_steps)))
        return
    if args.full and not args.device.startswith("cuda"):
        ap.error("--full needs --device cuda: the full-size Net (2.4 G parameters) is not run on the CPU")
    sections = set(args.only or ("full", "reduced", "memory", "kv_cache"))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    run = {
        # memory first: its fresh processes are spawned while this one is still small
        "memory": lambda: bench_memory([int(c) for c in args.memory_clips.split(",")], args.memory_size,
                                       args.memory_steps),
        "reduced": lambda: bench_reduced(args.device, args.reduced_size, args.reduced_steps),
        "full": lambda: bench_full(args.device, args.full_clips) if args.full else full_not_measured(args.device),
        "kv_cache": lambda: bench_kv_cache(args.device, args.kv_size, args.kv_steps, args.kv_repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in [name for name in run if name in sections]:
        results[name] = {**run[name](), "environment": environment(), "provenance": provenance.environment()}
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every section: nothing measured is lost
    print(table(results))


if __name__ == "__main__":
    main()
