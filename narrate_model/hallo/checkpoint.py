"""Loading Hallo's `net.pth` (or a safetensors copy) into `HalloNet`, strictly.

`net.pth` holds every weight of the Net, the trained AnimateDiff motion modules included (Hallo's inference.py
builds the denoising UNet from SD1.5 + `mm_sd_v15_v2.ckpt` and then overwrites all of it with a strict
`net.load_state_dict` of net.pth). A separate motion-module file is therefore optional: when given,
it only fills motion-module keys the net file lacks (AnimateDiff key names, e.g.
`down_blocks.0.motion_modules.0.temporal_transformer...`), and net.pth wins where both have a key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from ..errors import CheckpointError
from ..state_dict import key_mismatch, read_state_dict
from .net import HalloConfig, HalloNet, build_net, tiny_config

PathLike = Union[str, Path]


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming missing / unexpected / mis-shaped keys (a few of each, with counts)."""
    problems = key_mismatch(expected, state)
    if problems:
        raise CheckpointError(f"{what} does not match Hallo's Net layout: {problems}. "
                              "Use Hallo's net.pth (fudan-generative-ai/hallo, hallo/net.pth).")


def motion_module_state(path: PathLike) -> dict[str, torch.Tensor]:
    """AnimateDiff motion-module weights under the Net's `denoising_unet.` prefix."""
    return {f"denoising_unet.{k}": v for k, v in read_state_dict(path).items() if ".motion_modules." in k}


def load_net(net: HalloNet, path: PathLike, motion_module_path: Optional[PathLike] = None,
             dtype: Optional[torch.dtype] = None) -> HalloNet:
    """Load the Net's weights strictly (optionally cast to `dtype`).

    A net built on the meta device gets the loaded tensors assigned (no second copy of the weights in memory).
    """
    state = read_state_dict(path)
    if motion_module_path is not None:
        state = {**motion_module_state(motion_module_path), **state}
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(expected, state, Path(path).name)
    on_meta = any(p.is_meta for p in net.parameters())
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        if not on_meta:
            net.to(dtype)
    net.load_state_dict(state, strict=True, assign=on_meta)
    return net


def load_hallo(path: PathLike, motion_module_path: Optional[PathLike] = None,
               dtype: Optional[torch.dtype] = None, *, inference_only: bool = True) -> HalloNet:
    """Hallo's Net from `net.pth` (or a safetensors copy) with the SD1.5 + default.yaml layout built into the code.

    A JSON file next to the weights with the same name (`<name>.json`, the fixtures' `tiny_config.json` layout)
    describes a non-standard Net, e.g. a reduced one for tests; without it the real Hallo layout is used.
    inference_only: free the motion modules Hallo's inference never runs (~180 M parameters at full size, see
    `DenoisingUNet.drop_skipped_motion_modules`); False keeps them for the UNet's eval branch (training).
    """
    sidecar = Path(path).with_suffix(".json")
    config = tiny_config(sidecar) if sidecar.is_file() else HalloConfig()
    net = load_net(build_net(config, device="meta"), path, motion_module_path, dtype)
    if inference_only:
        net.denoising_unet.drop_skipped_motion_modules()
    return net
