"""What trains: the entangler by default, every other weight frozen and in eval mode; optionally named submodules
fully (e.g. Hallo's ``audio_modules`` / ``motion_modules`` / ``audioproj``, the XTTS GPT) or as LoRA adapters.

Modules are named by their qualified names under one root module holding every model (e.g. ``nn.ModuleDict(
{"xtts": ..., "hallo": ..., "entangler": ...})``), matched with fnmatch patterns (``hallo.*audio_modules*``). What
trains besides the entangler and the adapters is saved to its own file (``save_trained_modules``) and applied to a
freshly loaded base model with ``load_trained_modules``: the base checkpoints are never rewritten.
"""
from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..entangle import Entangler
from ..errors import CheckpointError
from .lora import LoRA, add_lora


def entanglers(root: nn.Module) -> dict[str, Entangler]:
    return {n: m for n, m in root.named_modules() if isinstance(m, Entangler)}


def select_trainable(root: nn.Module, modules=None, lora=(), lora_rank: int = 8, lora_alpha: float = 8.0) -> list[str]:
    """Freeze everything under ``root`` (requires_grad False, eval mode), then unfreeze (train mode) the modules whose
    names match ``modules`` (default: every Entangler) and add LoRA adapters to the layers matching ``lora``.
    Returns the names of the parameters that train."""
    root.requires_grad_(False)
    root.eval()
    if modules is None:
        chosen = list(entanglers(root))
        if not chosen:
            raise ValueError("the model holds no Entangler to train; name the modules to train")
    else:
        named = [n for n, _ in root.named_modules() if n]
        chosen = [n for n in named if any(fnmatch(n, p) for p in modules)]
        unmatched = [p for p in modules if not any(fnmatch(n, p) for n in named)]
        if unmatched:
            top = [n for n, _ in root.named_children()]
            raise ValueError(f"no module matches {unmatched}; top-level modules are {top} (patterns are fnmatch "
                             "over qualified names, e.g. 'hallo.*audio_modules*')")
    for name in chosen:
        root.get_submodule(name).requires_grad_(True).train()
    if lora:
        for name in add_lora(root, lora, lora_rank, lora_alpha):
            root.get_submodule(name).train()
    return [n for n, p in root.named_parameters() if p.requires_grad]


def trained_module_params(root: nn.Module) -> dict:
    """Trained parameters that are neither an entangler's nor a LoRA adapter's (those have their own files)."""
    skip = [n + "." for n in entanglers(root)] + [n + "." for n, m in root.named_modules() if isinstance(m, LoRA)]
    return {n: p for n, p in root.named_parameters() if p.requires_grad and not any(n.startswith(s) for s in skip)}


def save_trained_modules(root: nn.Module, path: str | os.PathLike) -> Path | None:
    params = trained_module_params(root)
    if not params:
        return None
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp),
              metadata={"nfy_trained_modules": "1"})
    os.replace(tmp, path)
    return path


def load_trained_modules(root: nn.Module, path: str | os.PathLike) -> list[str]:
    """Overwrite the parameters a ``save_trained_modules`` file holds (every key must exist with its shape)."""
    state, own = load_file(str(path)), dict(root.named_parameters())
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: the model has no parameter (or another shape) for {bad[:4]}; these weights "
                              "were trained for another model")
    for k, v in state.items():
        own[k].data.copy_(v)
    return list(state)
