"""An ESTIMATE (not a measurement) of the GPU memory a 512x512 narration needs, made on the meta device.

    python benchmarks/vram_estimate.py      # writes benchmarks/results/vram_estimate.json, prints the table

Weights: every parameter and buffer of the models the Narrate box holds at once (Hallo's Net without the unused
motion modules, the SD VAE, XTTS-v2, wav2vec2-base), at the bytes per number they are loaded with (fp16, wav2vec2
fp32). Activations: the full-size graph runs on meta tensors (no memory, no arithmetic) while every tensor an
operation creates is counted from its creation until it is freed; the largest sum alive at once is the peak. Two
passes are counted: one clip's Hallo work up to and through one denoising step (ReferenceNet banks, reference K/V,
the UNet call on both CFG halves of 16 frames) and one VAE decode batch. Attention is counted as a fused kernel
(flash / memory-efficient SDPA, what PyTorch uses on such GPUs): its output only, not a [queries x keys] matrix.
Not included: the CUDA context (~0.5 GB), the allocator's caching and fragmentation, cuDNN/cuBLAS workspaces. A
measured figure comes from benchmarks/gpu.sh on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from provenance import environment  # noqa: E402

from narrate_model.hallo.attention import ReferenceKVCache  # noqa: E402
from narrate_model.hallo.net import HalloConfig, build_net  # noqa: E402
from narrate_model.hallo.reference import write_banks  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "vram_estimate.json"
GB = 1e9


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensors created inside the mode that are still alive; the peak of that sum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.storages:  # a view of an existing tensor allocates nothing
                    self.storages.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self.free, key, storage.nbytes())
        return out

    def free(self, key: int, nbytes: int) -> None:
        self.storages.discard(key)
        self.live -= nbytes


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as a fused kernel: allocates its output only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **(kwargs or {}))


def count_peak(fn) -> int:
    with torch.no_grad(), FusedAttention(), LiveTensors() as live:
        fn()
    return live.peak


def weight_bytes(module: torch.nn.Module, bytes_per_number: int) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers())) * bytes_per_number


def clip_step(net, size: int, frames: int = 16, cached: bool = True):
    """One clip's Hallo work on meta tensors in fp16: ReferenceNet banks, reference K/V (when `cached`), and one
    denoising call on both CFG halves. Returns (prepare, step): call prepare() once, then step(*its result)."""
    c, h = net.config, size // 8
    dtype, meta = torch.float16, "meta"

    def prepare():
        face_tokens = torch.empty(2, c.imageproj.clip_extra_context_tokens, c.imageproj.cross_attention_dim,
                                  device=meta, dtype=dtype)
        banks = write_banks(net.reference_unet, torch.empty(3, 4, h, h, device=meta, dtype=dtype), face_tokens)
        cache = ReferenceKVCache() if cached else None
        if cached:
            net.denoising_unet.project_reference(banks, 2, cache)
        return face_tokens, banks, cache

    def step(face_tokens, banks, cache):
        audio = torch.empty(2, frames, c.audioproj.context_tokens, c.audioproj.output_dim, device=meta, dtype=dtype)
        masks = [[torch.empty(2 * frames, (-(-h // 2 ** level)) ** 2, device=meta, dtype=dtype) for level in range(4)]
                 for _ in range(3)]
        located = torch.empty(2, c.face_locator.conditioning_embedding_channels, frames, h, h, device=meta,
                              dtype=dtype)
        sample = torch.empty(2, 4, frames, h, h, device=meta, dtype=dtype)
        return net.denoising_unet(sample, 999, face_tokens, audio, masks, located, banks, uncond_plain=True,
                                  reference_kv=cache)
    return prepare, step


def hallo_step_peak(net, size: int, frames: int = 16) -> int:
    """One clip's ReferenceNet pass + reference K/V + one CFG denoising call, on meta tensors in fp16."""
    prepare, step = clip_step(net, size, frames)
    return count_peak(lambda: step(*prepare()))


def vae_decode_peak(vae, size: int, batch: int) -> int:
    return count_peak(lambda: vae.decode(torch.empty(batch, 4, size // 8, size // 8, device="meta",
                                                     dtype=torch.float16)))


def estimate(size: int = 512, decode_batch: int = 4) -> dict:
    from diffusers import AutoencoderKL
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from narrate_model.xtts.config import XttsConfig
    from narrate_model.xtts.model import XttsModel
    from gpu import SD_VAE

    net = build_net(HalloConfig(), device="meta").half()
    net.denoising_unet.drop_skipped_motion_modules()
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE).half().eval()
        wav2vec = Wav2Vec2Model(Wav2Vec2Config()).eval()
    xtts = XttsModel.from_config(XttsConfig.v2(), device="meta").half()
    weights = {"hallo_fp16": weight_bytes(net, 2), "vae_fp16": weight_bytes(vae, 2),
               "xtts_fp16": weight_bytes(xtts, 2), "wav2vec2_fp32": weight_bytes(wav2vec, 4)}
    activations = {"hallo_clip_step": hallo_step_peak(net, size), f"vae_decode_{decode_batch}_frames":
                   vae_decode_peak(vae, size, decode_batch)}
    total_weights = sum(weights.values())
    total = total_weights + max(activations.values())
    return {
        "kind": "ESTIMATE on the meta device, not a measurement",
        "size": size, "frames_per_clip": 16, "cfg_halves": 2, "decode_batch": decode_batch,
        "weights_gb": {k: round(v / GB, 3) for k, v in weights.items()},
        "weights_total_gb": round(total_weights / GB, 2),
        "activation_peak_gb": {k: round(v / GB, 3) for k, v in activations.items()},
        "estimated_total_gb": round(total / GB, 2),
        "formula": "all weights resident at once (one joint load) + the larger activation peak (the stages run one "
                   "after another)",
        "not_included": "CUDA context (~0.5 GB), allocator caching/fragmentation, cuDNN/cuBLAS workspaces, XTTS's "
                        "KV cache (~0.1 GB per sentence chunk at fp16)",
        "method": __doc__.split("\n\n")[2].replace("\n", " "),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    result = {**estimate(args.size, args.decode_batch), "environment": environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("method", "environment")}, indent=1))


if __name__ == "__main__":
    main()
