"""LoRA adapters for linear layers (torch `nn.Linear` and GPT-2's `Conv1D`), e.g. the XTTS GPT's attention and MLP
projections: y = W x + b + (alpha / rank) * B A x, with W frozen and only A [rank, in], B [out, rank] trained.

The adapters hook onto the layers (forward hooks) instead of wrapping them, so the model's own state-dict keys and
checkpoint files are untouched; the adapters are saved on their own (`save_lora`, safetensors with the config in the
metadata) and applied to a freshly loaded model with `load_lora`. `merge()` folds B A into the base weights for
inference without the extra matmuls, `unmerge()` takes it out again (exact up to float rounding).
B starts at zero, so a new adapter leaves the model's output unchanged until it is trained.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..xtts.gpt import Conv1D

METADATA_KEY = "nfy_lora"
GPT_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # XTTS GPT blocks' linear layers


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = GPT_PROJECTIONS  # a layer is adapted when its module path ends with one of these

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")


def _in_out(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]  # GPT-2 layout [in, out]
    raise TypeError(f"LoRA adapts nn.Linear or Conv1D layers, not {type(layer).__name__}")


class LoraAdapter(nn.Module):
    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        n_in, n_out = _in_out(layer)
        like = layer.weight
        self.lora_a = nn.Parameter(torch.empty(rank, n_in, device=like.device, dtype=like.dtype))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's init (and the LoRA paper's A)
        self.scale = alpha / rank
        self.transposed = isinstance(layer, Conv1D)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_a.T) @ self.lora_b.T * self.scale

    def delta(self) -> torch.Tensor:
        """B A scaled, in the base weight's layout."""
        d = self.lora_b @ self.lora_a * self.scale  # [out, in]
        return d.T if self.transposed else d


class Lora(nn.Module):
    """The adapters of one model, keyed by layer path; `parameters()` are what the optimiser trains."""

    def __init__(self, model: nn.Module, config: LoraConfig = LoraConfig()):
        super().__init__()
        self.config = config
        self.paths = [name for name, m in model.named_modules()
                      if name.endswith(config.targets) and isinstance(m, (nn.Linear, Conv1D))]
        if not self.paths:
            raise ValueError(f"no nn.Linear / Conv1D layer of the model ends with any of {config.targets}")
        layers = dict(model.named_modules())
        self.layers = [layers[p] for p in self.paths]  # plain list: not sub-modules of the adapter set
        self.adapters = nn.ModuleList(LoraAdapter(layer, config.rank, config.alpha) for layer in self.layers)
        self._hooks = [layer.register_forward_hook(self._hook(adapter))
                       for layer, adapter in zip(self.layers, self.adapters)]

    @staticmethod
    def _hook(adapter: LoraAdapter):
        def add_adapter(module, inputs, output):
            return output if adapter.merged else output + adapter(inputs[0])
        return add_adapter

    @torch.no_grad()
    def merge(self) -> None:
        for layer, adapter in zip(self.layers, self.adapters):
            if not adapter.merged:
                layer.weight.add_(adapter.delta().to(layer.weight.dtype))
                adapter.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        for layer, adapter in zip(self.layers, self.adapters):
            if adapter.merged:
                layer.weight.sub_(adapter.delta().to(layer.weight.dtype))
                adapter.merged = False

    def remove(self) -> None:
        """Detach the adapters from the model (unmerges first, so the base weights are as loaded)."""
        self.unmerge()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def tensors(self) -> dict[str, torch.Tensor]:
        """File layout: `<layer path>.lora_a` / `.lora_b`."""
        out = {}
        for path, adapter in zip(self.paths, self.adapters):
            out[f"{path}.lora_a"] = adapter.lora_a.detach().contiguous().cpu()
            out[f"{path}.lora_b"] = adapter.lora_b.detach().contiguous().cpu()
        return out


def add_lora(model: nn.Module, config: LoraConfig = LoraConfig()) -> Lora:
    """Attach fresh adapters (B = 0: the model's output is unchanged) to the model's target layers."""
    return Lora(model, config)


def save_lora(lora: Lora, path: str, extra_metadata: dict | None = None) -> None:
    metadata = {METADATA_KEY: json.dumps(asdict(lora.config))} | {k: str(v) for k, v in (extra_metadata or {}).items()}
    save_file(lora.tensors(), path, metadata=metadata)


def load_lora(model: nn.Module, path: str) -> Lora:
    """Attach the adapters saved in `path` to `model` (a freshly loaded base model of the same architecture)."""
    with safe_open(path, framework="pt") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
        if meta is None:
            raise CheckpointError(f"{path} is not an NFY LoRA file (no '{METADATA_KEY}' metadata)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    raw = json.loads(meta)
    config = LoraConfig(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]))
    lora = Lora(model, config)
    expected = lora.tensors()
    wrong = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state
                                                  and expected[k].shape != state[k].shape]
    if wrong:
        lora.remove()
        raise CheckpointError(f"{path} does not fit this model (rank {config.rank}): mismatched adapters "
                              f"{_few(wrong)}; load it onto the base model it was trained on")
    with torch.no_grad():
        for p, adapter in zip(lora.paths, lora.adapters):
            adapter.lora_a.copy_(state[f"{p}.lora_a"])
            adapter.lora_b.copy_(state[f"{p}.lora_b"])
    return lora


def _few(names: Iterable[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
