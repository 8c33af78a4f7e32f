"""Reading checkpoint files into flat {name: tensor} dicts: safetensors, or torch pickles read weights-only.

One reader for every loader. Pickled checkpoints are read with `torch.load(weights_only=True)` (memory-mapped when
the file allows it); objects of classes torch does not vet (XTTS pickles its training config next to the weights)
are loaded as inert stand-ins, never imported or run, and dropped. A top-level "model", "state_dict" or "module"
dict is the state dict, as upstream loaders read it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import torch

from .errors import CheckpointError

WRAPPER_KEYS = ("model", "state_dict", "module")


class _Inert:
    """Stands in for a non-tensor class pickled inside a checkpoint; holds its state and does nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _load_pickle(path: str):
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError):  # legacy (non-zip) format: weights_only vets it as it reads
        foreign = []
    with torch.serialization.safe_globals([(_Inert, name) for name in foreign]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), foreign
        except RuntimeError:  # legacy files cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True), foreign


def refusal(path: Path, exc: Exception) -> str:
    """Why a pickled checkpoint was not loaded: our sentence first (torch's own text can read like advice to turn
    the safety check off), then torch's detail in full, never a cut-off prefix."""
    return (f"{path.name} was not loaded: it is not a plain weights file (it would run code or build objects other "
            f"than tensors when unpickled), or it is truncated or corrupt. Download the file again from its "
            f"source, or use a .safetensors copy. Detail from torch ({type(exc).__name__}): {exc}")


def read_checkpoint(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, notes): the flat tensor dict of a checkpoint file and what was unwrapped or dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu"), {"inner_key": "", "dropped_keys": [], "foreign_classes": []}
    try:
        obj, foreign = _load_pickle(str(path))
    except Exception as exc:  # noqa: BLE001 - corrupt file, or pickled code that weights_only refuses
        raise CheckpointError(refusal(path, exc)) from exc
    inner = ""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            inner, obj = key, obj[key]
            break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path.name} holds no state dict (no tensors at the top level or under "
                              f"{' / '.join(WRAPPER_KEYS)})")
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    dropped = sorted(str(k) for k in obj if not torch.is_tensor(obj[k]))
    return tensors, {"inner_key": inner, "dropped_keys": dropped, "foreign_classes": list(foreign)}


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def listing(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def key_mismatch(expected: Mapping[str, Sequence[int]], state: Mapping[str, torch.Tensor]) -> str | None:
    """What differs between a module's expected {key: shape} and a state dict, as '3 missing: a, b, c; ...' (a few
    keys of each kind, with counts), or None when every key and shape matches."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
                 for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k])]
    parts = [f"{len(keys)} {label}: {listing(keys, 5 if label != 'mis-shaped' else 3)}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    return "; ".join(parts) or None
