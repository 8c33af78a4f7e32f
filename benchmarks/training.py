"""Training-step benchmark: seconds per optimiser step of NFY's objective (XTTS and Hallo frozen) and the peak memory
of a fresh process running it.

    python benchmarks/training.py                     # CPU: the reduced models; plus the meta-device memory estimate
    python benchmarks/training.py --device cuda --full   # GPU (one command, a few minutes): also both full-size runs

Each configuration runs in its own fresh process (so VmHWM, the peak resident memory, is its own) over a synthetic
sample with the shapes `python -m narrate_model prepare` caches (random values: the speed and memory of a step do not
depend on them). Modes:
  reduced    the fixtures' small XTTS (GPT width 64) and tiny Hallo Net at 64x64, 14 + 2 frames, 1 s of speech, fp32.
  full       XTTS-v2 and Hallo at full size with random weights, 512x512, 14 target + 2 motion frames (16), 1 s of
             speech voiced by HiFi-GAN, bf16 autocast, the UNet and the GPT checkpointed (non-reentrant); the
             entangler trains. Needs cuda; also reports torch.cuda.max_memory_allocated (the 24 GB target).
  full_lora  the same, plus LoRA adapters (rank 8) on the attention of Hallo's audio modules and of the GPT.
  estimate   no run: the full-size models built on the meta device, counted; the memory that does not depend on the
             activations (frozen weights, trained weights + gradients + AdamW's two moments), against 24 GB.
Results: benchmarks/results/training.json (a run replaces the sections it ran), each with provenance.environment().
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = REPO / "benchmarks" / "results" / "training.json"
FIXTURES = REPO.parent / "shared" / "fixtures"
TARGET_GB = 24
# LoRA targets of full_lora (objective-root names): the attention projections of Hallo's audio modules and the GPT's
LORA_MODULES = ("hallo.denoising_unet.*audio_modules*.to_[qkv]", "hallo.denoising_unet.*audio_modules*.to_out.0",
                "xtts.gpt.gpt.h.*.attn.c_attn", "xtts.gpt.gpt.h.*.attn.c_proj")


def synthetic_sample(size: int, frames: int, gpt_dim: int, audio_layers: int, audio_dim: int, text_tokens: int = 100):
    """A sample with the keys and shapes of a prepared one (train/data.py's load_sample)."""
    import torch

    g = torch.Generator().manual_seed(0)
    h = size // 8
    seconds = frames / 25
    wav_22k = round(22050 * seconds)
    sample = {
        "latents_mean": torch.randn(frames, 4, h, h, generator=g), "latents_std": torch.rand(frames, 4, h, h,
                                                                                             generator=g) * 0.1,
        "portrait_latent_mean": torch.randn(1, 4, h, h, generator=g),
        "portrait_latent_std": torch.rand(1, 4, h, h, generator=g) * 0.1,
        "face_region": (torch.rand(1, size, size, generator=g) > 0.5).float(),
        "identity": torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0),
        "audio_windows": torch.randn(frames, 5, audio_layers, audio_dim, generator=g),
        "target_wav_24k": torch.randn(round(24000 * seconds), generator=g) * 0.1,
        "dvae_codes": torch.randint(0, 1024, (math.ceil(wav_22k / 1024),), generator=g),
        "gpt_cond_latent": torch.randn(32, gpt_dim, generator=g),
        "speaker_embedding": torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0),
        "text_ids": torch.randint(10, 200, (text_tokens,), generator=g),
        "meta": {"id": "synthetic", "target_samples_22050": wav_22k},
    }
    for name in ("full", "face", "lip"):
        for level in range(4):
            side = -(-h // 2 ** level)
            sample[f"mask_{name}_{level}"] = torch.rand(1, side * side, generator=g)
    return sample


def _models(full: bool, device):
    import torch

    from narrate_model.hallo.net import HalloConfig, build_net
    from narrate_model.xtts.checkpoint import load_xtts
    from narrate_model.xtts.config import XttsConfig
    from narrate_model.xtts.model import XttsModel

    if full:
        with torch.device(device):
            return XttsModel(XttsConfig()).eval(), build_net(HalloConfig()), 512, 16 + 8, (12, 768)
    xtts, _ = load_xtts([FIXTURES / "xtts" / "small_config.json", FIXTURES / "xtts" / "small_model.safetensors"])
    return xtts, _tiny_hallo(), 64, 25, (2, 32)


def _tiny_hallo():
    """The fixtures' tiny Net (its layout is the same-name .json next to the weights)."""
    import shutil
    import tempfile

    from narrate_model.hallo.checkpoint import load_hallo

    folder = Path(tempfile.mkdtemp())
    shutil.copy(FIXTURES / "hallo" / "tiny_net.safetensors", folder / "net.safetensors")
    shutil.copy(FIXTURES / "hallo" / "tiny_config.json", folder / "net.json")
    return load_hallo(folder / "net.safetensors")


def _objective(mode: str, device):
    """(objective, sample) of a mode; the objective's trainable parameters are those of the mode."""
    import torch

    from narrate_model.train.config import TrainConfig
    from narrate_model.train.objective import build_objective, make_entangler
    from narrate_model.train.video_loss import VideoLossConfig

    full = mode != "reduced"
    xtts, net, size, frames, (layers, dim) = _models(full, device)
    sample = synthetic_sample(size, frames, xtts.gpt.cfg.gpt_n_model_channels, layers, dim)
    config = TrainConfig(lr=1e-4, batch_size=1, mixed_precision="bf16" if full else "no",
                         lora_modules=LORA_MODULES if mode.endswith("lora") else ())
    with torch.device(device):
        entangler = make_entangler("ETE", sample)
    objective = build_objective({"entangler": entangler, "xtts": xtts, "hallo": net}, config,
                                video_config=VideoLossConfig(), vocoder_window=None)
    xtts.gpt.gpt.gradient_checkpointing = full
    return objective, sample


def worker(mode: str, device: str, steps: int) -> dict:
    """One configuration in this (fresh) process."""
    import torch

    full = mode != "reduced"
    if not full:
        torch.set_num_threads(1)
    objective, sample = _objective(mode, device)
    objective = objective.to(device)
    batch = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in sample.items()}]
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, kernels) and is not timed
        torch.manual_seed(step)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=full):
            losses = objective(batch)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    out = {"seconds_per_step": sorted(times)[len(times) // 2], "steps_timed": len(times),
           "size": sample["face_region"].shape[-1], "frames": 14 + 2, "speech_seconds": 1.0,
           "trained_values": sum(p.numel() for p in params),
           "losses": {k: float(v) for k, v in losses.items()}, "vmhwm_mb": _vmhwm_mb()}
    if device == "cuda":
        out["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["fits_24gb"] = bool(out["cuda_max_allocated_gb"] <= TARGET_GB)
    return out


def estimate() -> dict:
    """The full-size models on the meta device (no memory, no run): what every full-size step holds whatever its
    activations. An ESTIMATE of the 24 GB target, not a measurement: the activations (UNet blocks recomputed under
    checkpointing, attention workspaces, HiFi-GAN) and the CUDA context come on top, and only the GPU run measures
    them."""
    out = {"kind": "ESTIMATE (meta device, analytic): activations and CUDA context NOT included"}
    for mode in ("full", "full_lora"):
        objective, _ = _objective(mode, "meta")
        frozen = sum(p.numel() for p in objective.parameters() if not p.requires_grad)
        trained = sum(p.numel() for p in objective.parameters() if p.requires_grad)
        gb = lambda values, nbytes: values * nbytes / 2 ** 30
        # trained: fp32 weight + fp32 gradient + AdamW's exp_avg and exp_avg_sq (fp32) = 16 bytes a value
        static_fp32 = gb(frozen, 4) + gb(trained, 16)
        static_bf16 = gb(frozen, 2) + gb(trained, 16)
        out[mode] = {"frozen_values": frozen, "trained_values": trained,
                     "frozen_weights_gb": {"fp32 (as loaded)": round(gb(frozen, 4), 2),
                                           "bf16 (cast)": round(gb(frozen, 2), 2)},
                     "trained_state_gb": round(gb(trained, 16), 3),
                     "static_gb": {"frozen fp32": round(static_fp32, 2), "frozen bf16": round(static_bf16, 2)},
                     "left_for_activations_gb": {"frozen fp32": round(TARGET_GB - static_fp32, 2),
                                                 "frozen bf16": round(TARGET_GB - static_bf16, 2)}}
        del objective
    return out


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="also the full-size steps (needs cuda)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(estimate() if args.worker == "estimate" else worker(args.worker, args.device, args.steps)))
        return 0
    if args.full and args.device != "cuda":
        parser.error("--full needs --device cuda (the full-size models take minutes and ~20 GB on a CPU)")
    from provenance import environment

    modes = ["reduced", "estimate"] + (["full", "full_lora"] if args.full else [])
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for mode in modes:
        device = args.device if mode.startswith("full") else "cpu"
        run = subprocess.run([sys.executable, __file__, "--worker", mode, "--device", device, "--steps",
                              str(args.steps)], capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        results[mode] = {**json.loads(run.stdout.strip().splitlines()[-1]), "environment": environment()}
        print(mode, json.dumps(results[mode], indent=1), flush=True)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")  # after each mode: a later failure keeps it
    return 0


if __name__ == "__main__":
    sys.exit(main())
