"""LoRA adapters (Hu et al. 2021) for ``nn.Linear`` and GPT-2 ``Conv1D`` layers, saved apart from the base weights.

``add_lora`` wraps every layer whose qualified name matches a pattern: the wrapper keeps the frozen base layer and adds
``scale * B(A(x))`` with ``A`` [r, in] (Kaiming init) and ``B`` [out, r] (zeros), so a fresh adapter changes nothing
and its first step already trains. ``merge`` folds ``scale * B @ A`` into the base weight (no inference cost),
``unmerge`` takes it out again. ``save_adapters`` writes only the adapter matrices (``<layer>.lora_A`` /
``<layer>.lora_B``, rank / alpha / targets in the metadata): a user's base checkpoint is never rewritten.
``apply_adapters`` wraps the same layers of a freshly loaded model, loads the file and (by default) merges and
unwraps, so the model's keys and speed are exactly those of the base model afterwards.
"""
from __future__ import annotations

import json
import math
import os
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import CheckpointError

METADATA_KEY = "nfy_lora"


def _is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's Conv1D (ours in xtts/gpt.py, or transformers'): a linear layer whose weight is stored [in, out]."""
    return type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None \
        and layer.weight.dim() == 2


def adaptable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or _is_conv1d(layer)


class LoRA(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if not adaptable(base):
            raise TypeError(f"LoRA wraps nn.Linear or GPT-2 Conv1D layers, not {type(base).__name__}")
        self.base, self.conv1d = base, _is_conv1d(base)
        n_in, n_out = base.weight.shape[::-1] if not self.conv1d else base.weight.shape
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, n_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's weight
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merged = False

    def delta(self) -> Tensor:
        """The adapter's change of the base weight, in the base weight's layout."""
        d = (self.lora_B @ self.lora_A) * self.scale  # [out, in]
        return d.T if self.conv1d else d

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(y.dtype) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def add_lora(root: nn.Module, patterns, rank: int, alpha: float) -> list[str]:
    """Wrap the Linear / Conv1D layers whose qualified names match any pattern; returns their names.

    The wrappers' base layers are frozen; only ``lora_A`` / ``lora_B`` train."""
    names = [n for n, m in root.named_modules() if adaptable(m) and any(fnmatch(n, p) for p in patterns)]
    if not names:
        layers = [n for n, m in root.named_modules() if adaptable(m)][:8]
        raise ValueError(f"no Linear / Conv1D layer matches the LoRA patterns {list(patterns)} (layer names look "
                         f"like {layers})")
    for name in names:
        layer = LoRA(root.get_submodule(name), rank, alpha)
        layer.base.requires_grad_(False)
        _replace(root, name, layer)
    return names


def adapters(root: nn.Module) -> dict[str, LoRA]:
    """The LoRA wrappers of a model, by the name of the layer they wrap."""
    return {n: m for n, m in root.named_modules() if isinstance(m, LoRA)}


def save_adapters(root: nn.Module, path: str | os.PathLike) -> Path:
    """Write only the adapter matrices (atomically: a temporary file renamed into place)."""
    found = adapters(root)
    if not found:
        raise ValueError("the model has no LoRA adapters to save")
    ranks = {(m.rank, m.alpha) for m in found.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapters of different rank / alpha {sorted(ranks)} cannot share one file")
    (rank, alpha), = ranks
    state = {f"{n}.{k}": getattr(m, k).detach().contiguous().cpu() for n, m in found.items()
             for k in ("lora_A", "lora_B")}
    meta = {"rank": rank, "alpha": alpha, "targets": list(found)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def apply_adapters(root: nn.Module, path: str | os.PathLike, merge: bool = True) -> list[str]:
    """Apply a file written by ``save_adapters`` to a freshly loaded base model; with ``merge`` the adapters are
    folded into the base weights and the wrappers removed (the model keeps its base keys and speed)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise CheckpointError(f"{path} is not an NFY LoRA file (no '{METADATA_KEY}' metadata)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    modules = dict(root.named_modules())
    missing = [t for t in meta["targets"] if not adaptable(modules.get(t, nn.Identity()))]
    if missing:
        raise CheckpointError(f"{path}: the model has no Linear / Conv1D layer {missing[:4]}; these adapters were "
                              "trained for another model")
    for name in meta["targets"]:
        layer = LoRA(modules[name], meta["rank"], meta["alpha"])
        for key in ("lora_A", "lora_B"):
            value = state[f"{name}.{key}"]
            if value.shape != getattr(layer, key).shape:
                raise CheckpointError(f"{path}: {name}.{key} is {tuple(value.shape)}, the model's layer needs "
                                      f"{tuple(getattr(layer, key).shape)}")
            getattr(layer, key).data.copy_(value)
        if merge:
            layer.merge()
            layer = layer.base
        _replace(root, name, layer)
    return list(meta["targets"])
