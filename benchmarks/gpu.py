"""The GPU figures of issue 14 in one run: full-size models with RANDOM weights (no checkpoint needed), bf16 and fp16.

    bash benchmarks/gpu.sh                               # on a GPU machine: benchmarks/results/gpu_<device>.json
    bash benchmarks/gpu.sh --device cpu --tiny --out x.json   # every section at toy sizes in seconds (the CI dry run)

Sections (each in its own try block: one that fails is recorded with its error, the others still report):
  hallo_<dtype>           Hallo at 512x512, 40 DDIM steps, CFG 3.5: one 16-frame clip after a 2-step warm-up clip;
                          seconds per frame (ReferenceNet pass + denoising, no VAE) and peak memory
  hallo_compiled_<dtype>  the same with the denoising UNet under torch.compile; the compile (+ warm-up) time is
                          reported apart, and the largest difference from the eager clip of the same weights and seed
  xtts_<dtype>            XTTS-v2's GPT writing the codes of ~10 s of speech (stop token disabled, greedy) and the
                          HiFi-GAN voicing them: seconds per code, real-time factor, peak memory
  vae_<dtype>             sd-vae-ft-mse decoding 16 frames in batches of --decode-batch: seconds per frame, peak
  narration_<dtype>       ~10 s of narration: XTTS codes -> HiFi-GAN -> wav2vec2 features -> Hallo over every clip
                          (motion frames carried through the VAE) -> VAE decode of every frame; wall time and peak.
                          Face detection and the .mp4 mux are left out (no mediapipe or PyAV on the GPU machine): the
                          face inputs are synthetic, decoded frames are dropped
Peak memory is torch.cuda.max_memory_allocated on a GPU; on the CPU it is the process's peak RSS (VmHWM), which
includes everything before the section. Sections that would not fit in --budget-s are recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo root holds narrate_model
sys.path.insert(0, str(REPO / "benchmarks"))
from provenance import environment  # noqa: E402

from narrate_model.hallo.audio import speech_features  # noqa: E402
from narrate_model.hallo.motion import MotionModuleConfig  # noqa: E402
from narrate_model.hallo.net import (AudioProjConfig, FaceLocatorConfig, HalloConfig, ImageProjConfig,  # noqa: E402
                                     build_net, compile_unet)
from narrate_model.hallo.sampler import FaceInputs, SamplerSettings, diffusers_vae_callables, sample_video  # noqa
from narrate_model.hallo.unet import UNet3DConfig  # noqa: E402
from narrate_model.xtts.config import XttsConfig  # noqa: E402
from narrate_model.xtts.model import XttsModel  # noqa: E402
from narrate_model.xtts.sampling import SamplingParams  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HALLO_PUBLISHED = {"seconds_per_frame": 1.63, "gpu": "A100", "size": 512, "peak_gpu_memory_gb": 9.77,
                   "source": "Hallo paper, Table 7 (quoted in fudan-generative-vision/hallo#28)"}
GOAL = {"seconds_per_frame": 0.15, "size": 512, "steps": 40, "gpu": "one H100/H200 class GPU",
        "narration_peak_gpu_memory_gb": 8, "source": "issue 14"}
CODES_PER_SECOND = 22050 / 1024  # one GPT code per 1024 samples at 22.05 kHz (21.5 codes per second of speech)


@dataclass(frozen=True)
class Sizes:
    """What one run measures: Hallo's settings on the full models, or toy sizes for the CPU dry run."""
    hallo: HalloConfig
    xtts: XttsConfig
    wav2vec: dict  # transformers Wav2Vec2Config arguments
    vae: dict  # diffusers AutoencoderKL arguments
    size: int = 512
    steps: int = 40
    cfg: float = 3.5
    clip_length: int = 16
    motion_frames: int = 2
    speech_seconds: float = 10.0
    text_tokens: int = 60  # BPE tokens of a ~10 s sentence


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              norm_num_groups=32, sample_size=512)
FULL = Sizes(hallo=HalloConfig(), xtts=XttsConfig.v2(), wav2vec={}, vae=SD_VAE)
TINY = Sizes(
    hallo=HalloConfig(
        unet=UNet3DConfig(block_out_channels=(32,), layers_per_block=1, attention_heads=2, cross_attention_dim=16,
                          audio_attention_dim=16, norm_num_groups=8, motion=MotionModuleConfig(num_attention_heads=2),
                          motion_module_resolutions=(1,)),
        face_locator=FaceLocatorConfig(conditioning_embedding_channels=32, block_out_channels=(8, 8, 8, 8)),
        imageproj=ImageProjConfig(cross_attention_dim=16, clip_embeddings_dim=512, clip_extra_context_tokens=2),
        audioproj=AudioProjConfig(blocks=2, channels=16, intermediate_dim=16, output_dim=16, context_tokens=4)),
    xtts=XttsConfig(gpt_layers=2, gpt_n_model_channels=64, gpt_n_heads=4, decoder_input_dim=64,
                    upsample_initial_channel_decoder=32, speaker_encoder_layers=[1, 1, 1, 1],
                    speaker_encoder_num_filters=[8, 8, 8, 8]),
    wav2vec=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
    vae=dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             norm_num_groups=4, sample_size=64),
    size=64, steps=2, clip_length=4, speech_seconds=0.2, text_tokens=8)


# --------------------------------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return {"peak_rss_gb": round(int(line.split()[1]) / 1e6, 3)}
    return {}


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def face_inputs(sizes: Sizes) -> FaceInputs:
    """Synthetic portrait conditioning (no face detector on the GPU machine): a face box in the middle of the frame,
    the lips in its lower third, a random identity embedding."""
    latent = sizes.size // 8
    generator = torch.Generator().manual_seed(0)

    def masks(top: float, bottom: float, left: float, right: float) -> list[torch.Tensor]:
        out = []
        for level in range(4):
            side = -(-latent // 2 ** level)
            mask = torch.zeros(side, side)
            mask[int(top * side):max(int(bottom * side), int(top * side) + 1),
                 int(left * side):max(int(right * side), int(left * side) + 1)] = 1
            out.append(mask.flatten())
        return out
    region = torch.zeros(3, sizes.size, sizes.size)
    region[:, sizes.size // 4:3 * sizes.size // 4, sizes.size // 4:3 * sizes.size // 4] = 1
    return FaceInputs(torch.randn(512, generator=generator), region, masks(0, 1, 0, 1),
                      masks(.25, .75, .25, .75), masks(.55, .7, .35, .65))


def audio_windows(sizes: Sizes, frames: int) -> torch.Tensor:
    ap = sizes.hallo.audioproj
    return torch.randn(frames, ap.seq_len, ap.blocks, ap.channels, generator=torch.Generator().manual_seed(1))


def build_vae(sizes: Sizes, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**sizes.vae)
    return vae.to(dtype).eval()


def build_hallo(sizes: Sizes, device: str, dtype: torch.dtype):
    torch.manual_seed(0)  # the same weights for the eager and the compiled section
    net = build_net(sizes.hallo, device=device).to(dtype)
    net.denoising_unet.drop_skipped_motion_modules()  # as load_hallo does
    return net


def cast_xtts(model: XttsModel, dtype: torch.dtype) -> XttsModel:
    """XTTS in `dtype`. A plain cast for now: the Load XTTS precision option (issue 14, other branch) replaces
    this one function."""
    return model.to(dtype)


def build_xtts(sizes: Sizes, device: str, dtype: torch.dtype) -> XttsModel:
    torch.manual_seed(0)
    model = XttsModel.from_config(sizes.xtts, device=device).eval()
    with torch.no_grad():
        # random weights rarely say "stop": disable it so exactly the codes of the wanted length are written
        model.gpt.mel_head.bias[sizes.xtts.gpt_stop_audio_token] = float("-inf")
    return cast_xtts(model, dtype)


# --------------------------------------------------------------------------------------------------------- sections
class Run:
    def __init__(self, sizes: Sizes, device: str, decode_batch: int):
        self.sizes, self.device, self.decode_batch = sizes, device, decode_batch
        self.eager_clip: dict[str, torch.Tensor] = {}  # dtype name -> latents of the eager Hallo clip
        self.hallo_seconds_per_frame: dict[str, float] = {}

    def settings(self, steps: Optional[int] = None) -> SamplerSettings:
        s = self.sizes
        return SamplerSettings(steps=steps or s.steps, cfg=s.cfg, seed=0, clip_length=s.clip_length,
                               motion_frames=s.motion_frames)

    def hallo_clip(self, net, vae, steps: Optional[int] = None) -> torch.Tensor:
        """One clip's latents (frames = clip length: the VAE is not called inside the sampler)."""
        encode, decode = diffusers_vae_callables(vae)
        s = self.sizes
        ref = torch.randn(1, 4, s.size // 8, s.size // 8, generator=torch.Generator().manual_seed(2))
        return sample_video(net, face_inputs(s), audio_windows(s, s.clip_length), ref, self.settings(steps),
                            vae_encode=encode, vae_decode=decode)

    @torch.no_grad()
    def hallo(self, name: str, compiled: bool = False) -> dict:
        dtype, s, device = DTYPES[name], self.sizes, self.device
        (net, vae), build_s = timed(lambda: (build_hallo(s, device, dtype), build_vae(s, device, dtype)), device)
        result = {"dtype": name, "size": s.size, "steps": s.steps, "cfg": s.cfg, "frames": s.clip_length,
                  "net_parameters": parameters(net), "weights": "random (PyTorch default init)",
                  "build_s": round(build_s, 2)}
        if compiled:
            backend = "inductor" if device.startswith("cuda") else "aot_eager"  # inductor on 2 CPU cores: minutes
            compile_unet(net, backend=backend)
            result["compile_backend"] = backend
        _, warm_s = timed(lambda: self.hallo_clip(net, vae, steps=2), device)
        result["compile_and_warmup_s" if compiled else "warmup_s"] = round(warm_s, 2)
        reset_peak(device)
        latents, clip_s = timed(lambda: self.hallo_clip(net, vae), device)
        result.update({"clip_s": round(clip_s, 3), "seconds_per_frame": round(clip_s / s.clip_length, 4),
                       **peak_memory(device)})
        if compiled:
            from torch._dynamo.utils import counters

            result["graphs_compiled_so_far"] = counters["stats"]["unique_graphs"]
            eager = self.eager_clip.get(name)
            result["max_abs_diff_vs_eager"] = None if eager is None else (latents - eager).abs().max().item()
        else:
            self.eager_clip[name] = latents
            self.hallo_seconds_per_frame[name] = clip_s / s.clip_length
        result["note"] = ("ReferenceNet pass + all denoising steps of one clip (both CFG halves), per output frame; "
                          "VAE decode not included (see vae_*)")
        return result

    @torch.no_grad()
    def speech(self, model: XttsModel) -> tuple[torch.Tensor, dict]:
        """~speech_seconds of speech from random text ids: (24 kHz waveform, timings)."""
        s, device = self.sizes, self.device
        codes = max(1, round(s.speech_seconds * CODES_PER_SECOND))
        text = torch.randint(3, 5000, (1, s.text_tokens),
                             generator=torch.Generator().manual_seed(3)).to(device)
        dtype = next(model.parameters()).dtype
        cond = torch.randn(1, 32, s.xtts.gpt_n_model_channels, generator=torch.Generator().manual_seed(4))
        cond = cond.to(device, dtype)
        speaker = torch.randn(1, s.xtts.d_vector_dim, 1, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        params = SamplingParams(do_sample=False, max_new_tokens=codes)
        result, gpt_s = timed(lambda: model.gpt.generate(text, cond, params), device)
        if result.codes.shape[1] != codes:
            raise RuntimeError(f"generated {result.codes.shape[1]} codes, wanted {codes}")
        wav, vocoder_s = timed(lambda: model.hifigan_decoder(result.latents.to(dtype), speaker), device)
        wav = wav.reshape(-1).float()
        audio_s = wav.numel() / s.xtts.output_sample_rate
        return wav, {"codes": codes, "text_tokens": s.text_tokens, "gpt_s": round(gpt_s, 3),
                     "seconds_per_code": round(gpt_s / codes, 5), "vocoder_s": round(vocoder_s, 3),
                     "audio_s": round(audio_s, 3), "real_time_factor": round((gpt_s + vocoder_s) / audio_s, 4)}

    @torch.no_grad()
    def xtts(self, name: str) -> dict:
        model, build_s = timed(lambda: build_xtts(self.sizes, self.device, DTYPES[name]), self.device)
        warm = SamplingParams(do_sample=False, max_new_tokens=3)
        text = torch.randint(3, 200, (1, 4)).to(self.device)
        cond = torch.zeros(1, 32, self.sizes.xtts.gpt_n_model_channels, device=self.device, dtype=DTYPES[name])
        model.gpt.generate(text, cond, warm)  # warm-up
        reset_peak(self.device)
        _, measured = self.speech(model)
        return {"dtype": name, "parameters": parameters(model), "weights": "random (PyTorch default init)",
                "build_s": round(build_s, 2), "decoding": "greedy, stop token disabled", **measured,
                **peak_memory(self.device),
                "note": "real_time_factor = (GPT + HiFi-GAN seconds) / seconds of audio; < 1 is faster than real time"}

    @torch.no_grad()
    def vae(self, name: str) -> dict:
        s, device = self.sizes, self.device
        vae = build_vae(s, device, DTYPES[name])
        _, decode = diffusers_vae_callables(vae)
        latents = torch.randn(s.clip_length, 4, s.size // 8, s.size // 8, device=device)
        decode(latents[:1])  # warm-up
        reset_peak(device)
        _, decode_s = timed(lambda: [decode(part) for part in latents.split(self.decode_batch)], device)
        return {"dtype": name, "size": s.size, "frames": s.clip_length, "decode_batch": self.decode_batch,
                "decode_s": round(decode_s, 3), "seconds_per_frame": round(decode_s / s.clip_length, 4),
                **peak_memory(device)}

    @torch.no_grad()
    def narration(self, name: str) -> dict:
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        s, device, dtype = self.sizes, self.device, DTYPES[name]
        torch.manual_seed(0)
        with torch.device(device):
            wav2vec = Wav2Vec2Model(Wav2Vec2Config(**s.wav2vec)).eval()
        xtts, net, vae = build_xtts(s, device, dtype), build_hallo(s, device, dtype), build_vae(s, device, dtype)
        encode, decode = diffusers_vae_callables(vae)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        wav, speech = self.speech(xtts)
        features = speech_features(wav2vec, wav[None].cpu(), s.xtts.output_sample_rate, Fraction(25), s.clip_length)
        ref = torch.randn(1, 4, s.size // 8, s.size // 8, generator=torch.Generator().manual_seed(2))
        windows = features.windows[:features.num_frames]
        latents = sample_video(net, face_inputs(s), windows, ref, self.settings(), vae_encode=encode,
                               vae_decode=decode)
        for part in latents.split(self.decode_batch):
            decode(part)
        sync(device)
        wall = time.perf_counter() - t0
        return {"dtype": name, "speech_s": speech["audio_s"], "frames": features.num_frames, "fps": 25,
                "clips": -(-features.num_frames // s.clip_length), "steps": s.steps, "cfg": s.cfg,
                "wall_s": round(wall, 2), "seconds_per_frame": round(wall / features.num_frames, 4),
                **peak_memory(device), "wav2vec": "wav2vec2-base layout, random weights, fp32",
                "left_out": "face detection and .mp4 muxing (synthetic face inputs, decoded frames dropped)"}


def estimate_s(run: Run, section: str, dtype: str) -> float:
    """A rough lower bound of a section's time from what was measured already (0 when nothing is known)."""
    per_frame = run.hallo_seconds_per_frame.get(dtype) or next(iter(run.hallo_seconds_per_frame.values()), 0)
    if section == "hallo_compiled":
        return 2 * per_frame * run.sizes.clip_length
    if section == "narration":
        frames = run.sizes.speech_seconds * 25
        return per_frame * frames
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: the whole script in seconds (CPU dry run)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/gpu_<device>.json)")
    ap.add_argument("--dtypes", help="default bf16,fp16 on a GPU; fp32 on the CPU, where half precision measures "
                                     "nothing and only slows the dry run")
    ap.add_argument("--sections", default="hallo,xtts,vae,narration,hallo_compiled",
                    help="which sections, in the order they run (per dtype)")
    ap.add_argument("--decode-batch", type=int, default=8, help="frames per VAE decode call")
    ap.add_argument("--budget-s", type=float, default=420, help="skip sections that would end after this")
    ap.add_argument("--fail", action="append", default=[],
                    help="make this section raise (e.g. xtts_fp16), to check that the report keeps the others")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU; use --device cpu --tiny for a dry run")
    sizes = TINY if args.tiny else FULL
    args.dtypes = args.dtypes or ("bf16,fp16" if args.device.startswith("cuda") else "fp32")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_{device_name.replace(' ', '_')}.json"
    report = {"device": device_name, "tiny": args.tiny, "hallo_published": HALLO_PUBLISHED, "goal": GOAL,
              "environment": environment(), "sections": {}}
    run = Run(sizes, args.device, args.decode_batch)
    jobs = {"hallo": run.hallo, "xtts": run.xtts, "vae": run.vae, "narration": run.narration,
            "hallo_compiled": lambda name: run.hallo(name, compiled=True)}
    for section in args.sections.split(","):
        for dtype in args.dtypes.split(","):
            key = f"{section}_{dtype}"
            left = args.budget_s - (time.perf_counter() - start)
            if estimate_s(run, section, dtype) > left:
                report["sections"][key] = {"error": f"skipped: about {estimate_s(run, section, dtype):.0f} s needed, "
                                                    f"{left:.0f} s of --budget-s left"}
            else:
                t0 = time.perf_counter()
                try:
                    if key in args.fail:
                        raise RuntimeError(f"{key} failed on request (--fail)")
                    report["sections"][key] = {**jobs[section](dtype), "section_s": round(time.perf_counter() - t0, 2)}
                except Exception as error:  # one failure must not cost the other figures
                    report["sections"][key] = {"error": f"{type(error).__name__}: {error}",
                                               "traceback": traceback.format_exc(limit=4)}
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print(f"{key}: {json.dumps(report['sections'][key])[:300]}", flush=True)
            report["total_s"] = round(time.perf_counter() - start, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")  # after every section: nothing measured is lost
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
