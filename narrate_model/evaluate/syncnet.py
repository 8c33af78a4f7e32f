"""LSE-D and LSE-C: SyncNet (Chung & Zisserman 2016) distances between 5-frame mouth windows and 0.2 s of MFCCs,
the lip-sync scores of the Wav2Lip evaluation (Prajwal et al. 2020), which runs joonson/syncnet_python.

Recipe (syncnet_python's SyncNetInstance.evaluate, with its defaults): video at 25 fps as 224x224 BGR frames with
0..255 values; audio at 16 kHz, int16 scale, 13 MFCCs every 10 ms (python_speech_features defaults); one visual
embedding per 5-frame window and one audio embedding per 20 MFCC frames starting at the same time; for every
window the Euclidean distances to the audio embeddings at offsets -15..+15 frames (zero-padded); their mean over
windows is a distance-per-offset curve. LSE-D is its minimum, LSE-C its median minus its minimum, and the offset of
the minimum the A/V offset, reported with this pack's sign (positive = audio late), the opposite of the sign
syncnet_python prints.

Face crop: syncnet_python's pipeline detects the face with S3FD, median-filters the track (13 frames) of the box
centre and half-size s = max(w, h) / 2, pads the frame with grey 110 and cuts rows cy - s .. cy + 1.8 s and columns
cx - 1.4 s .. cx + 1.4 s (crop_scale 0.4), resized to 224. `face_crops` does the same with the MediaPipe face-mesh
box instead of S3FD's (this pack has no S3FD; the mesh box is a little taller, from the brow to the chin), so LSE
here is close to, not identical with, published LSE. Without a face track the frames are used whole (noted).
Compare systems only with numbers computed the same way.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .base import MetricSkipped, weights_help
from .speech import resample_np

SYNCNET_FPS, SYNCNET_SR, SYNCNET_SIZE, SYNCNET_WINDOW, SYNCNET_VSHIFT = 25, 16000, 224, 5, 15
SYNCNET_HELP = weights_help("syncnet/syncnet_v2.model")


def _conv_bn(conv: nn.Module, channels: int, three_d: bool) -> list[nn.Module]:
    return [conv, (nn.BatchNorm3d if three_d else nn.BatchNorm2d)(channels), nn.ReLU(inplace=True)]


class SyncNet(nn.Module):
    """syncnet_python's `S` model in its state-dict layout: netcnnaud + netfcaud (MFCC [B, 1, 13, 20] -> 1024),
    netcnnlip + netfclip (frames [B, 3, 5, 224, 224] -> 1024). Sequential indices match the original."""

    def __init__(self, embedding: int = 1024):
        super().__init__()
        c2, c3 = nn.Conv2d, nn.Conv3d
        self.netcnnaud = nn.Sequential(
            *_conv_bn(c2(1, 64, 3, padding=1), 64, False), nn.MaxPool2d(1, 1),
            *_conv_bn(c2(64, 192, 3, padding=1), 192, False), nn.MaxPool2d(3, (1, 2)),
            *_conv_bn(c2(192, 384, 3, padding=1), 384, False),
            *_conv_bn(c2(384, 256, 3, padding=1), 256, False),
            *_conv_bn(c2(256, 256, 3, padding=1), 256, False), nn.MaxPool2d(3, 2),
            *_conv_bn(c2(256, 512, (5, 4)), 512, False))
        self.netcnnlip = nn.Sequential(
            *_conv_bn(c3(3, 96, (5, 7, 7), (1, 2, 2)), 96, True), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_bn(c3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), 256, True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, True),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, True),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, True), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv_bn(c3(256, 512, (1, 6, 6)), 512, True))
        for name in ("netfcaud", "netfclip"):
            self.add_module(name, nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                                nn.Linear(512, embedding)))

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(frames).flatten(1))


@functools.lru_cache(maxsize=2)
def load_syncnet(path: str, device: str = "cpu") -> SyncNet:
    """SyncNet from syncnet_v2.model (a pickled state dict, read with weights_only=True) or a .safetensors copy."""
    from .video import _state_dict

    model = SyncNet()
    try:
        model.load_state_dict(_state_dict(path))
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not syncnet_python's syncnet_v2.model state dict: {str(error)[:500]}") \
            from error
    except Exception as error:
        if isinstance(error, MetricSkipped):
            raise
        raise CheckpointError(f"{path} could not be read as a state dict with torch.load(weights_only=True): "
                              f"{error}. Convert a pickled model to its state_dict first.") from error
    return model.to(device).eval()


# --- python_speech_features' MFCC, as syncnet_python calls it (all defaults) ---------------------------------------
MFCC_WIN, MFCC_STEP, MFCC_NFFT, MFCC_FILTERS, MFCC_CEPS, MFCC_LIFTER, MFCC_PREEMPH = 400, 160, 512, 26, 13, 22, 0.97


@functools.cache
def _mfcc_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mel = lambda hz: 2595 * np.log10(1 + hz / 700.0)
    points = np.linspace(mel(0), mel(SYNCNET_SR / 2), MFCC_FILTERS + 2)
    bins = np.floor((MFCC_NFFT + 1) * (700 * (10 ** (points / 2595.0) - 1)) / SYNCNET_SR).astype(int)
    fbank = np.zeros((MFCC_FILTERS, MFCC_NFFT // 2 + 1))
    for j in range(MFCC_FILTERS):
        for i in range(bins[j], bins[j + 1]):
            fbank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(bins[j + 1], bins[j + 2]):
            fbank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    n = np.arange(MFCC_FILTERS)
    dct = np.cos(np.pi * np.arange(MFCC_CEPS)[:, None] * (2 * n + 1) / (2 * MFCC_FILTERS)) * math.sqrt(
        2 / MFCC_FILTERS)
    dct[0] /= math.sqrt(2)
    lifter = 1 + (MFCC_LIFTER / 2) * np.sin(np.pi * np.arange(MFCC_CEPS) / MFCC_LIFTER)
    return fbank, dct, lifter


def mfcc(samples: np.ndarray) -> np.ndarray:
    """[frames, 13] MFCCs of 16 kHz int16-scale samples: pre-emphasis 0.97, 25 ms rectangular frames every 10 ms
    (the last zero-padded), 512-point power spectrum / 512, 26 mel filters, log, orthonormal DCT-II, lifter 22, and
    c0 replaced by the log frame energy."""
    x = np.append(samples[0], samples[1:] - MFCC_PREEMPH * samples[:-1]).astype(np.float64)
    count = 1 if len(x) <= MFCC_WIN else 1 + math.ceil((len(x) - MFCC_WIN) / MFCC_STEP)
    x = np.pad(x, (0, (count - 1) * MFCC_STEP + MFCC_WIN - len(x)))
    frames = x[np.arange(count)[:, None] * MFCC_STEP + np.arange(MFCC_WIN)]
    power = np.abs(np.fft.rfft(frames, MFCC_NFFT)) ** 2 / MFCC_NFFT
    tiny = np.finfo(float).eps
    energy = power.sum(1)
    fbank, dct, lifter = _mfcc_matrices()
    feats = np.log(np.where((banded := power @ fbank.T) == 0, tiny, banded)) @ dct.T * lifter
    feats[:, 0] = np.log(np.where(energy == 0, tiny, energy))
    return feats


CROP_SCALE, TRACK_FILTER, PAD_GREY = 0.4, 13, 110


def _median_filter(x: np.ndarray, k: int) -> np.ndarray:
    """scipy.signal.medfilt's zero-padded running median of odd width k."""
    half = k // 2
    padded = np.pad(x, half)
    return np.array([np.median(padded[i:i + k]) for i in range(len(x))])


def face_crops(frames: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """IMAGE [N, H, W, 3] 0..1 + per-frame face boxes [N, 4] (x0, y0, x1, y1 px; NaN rows = no face, filled from
    the nearest frames) -> [N, 224, 224, 3] crops as syncnet_python's crop_video cuts them (module docstring)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if len(boxes) < TRACK_FILTER:  # the zero-padded filter would shrink a shorter track's boxes towards 0
        raise MetricSkipped(f"SyncNet's face crop needs a face track of at least {TRACK_FILTER} frames")
    found = ~np.isnan(boxes).any(1)
    if not found.any():
        raise MetricSkipped("no face found in any frame for SyncNet's face crop")
    idx = np.arange(len(boxes))
    boxes = np.stack([np.interp(idx, idx[found], boxes[found, j]) for j in range(4)], 1)
    size = _median_filter(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2, TRACK_FILTER)
    cx = _median_filter((boxes[:, 0] + boxes[:, 2]) / 2, TRACK_FILTER)
    cy = _median_filter((boxes[:, 1] + boxes[:, 3]) / 2, TRACK_FILTER)
    out = []
    for i, frame in enumerate(frames):
        s, pad = size[i], int(size[i] * (1 + 2 * CROP_SCALE))
        image = F.pad(frame.float().permute(2, 0, 1), (pad, pad, pad, pad), value=PAD_GREY / 255)
        y, x = cy[i] + pad, cx[i] + pad
        face = image[:, int(y - s):int(y + s * (1 + 2 * CROP_SCALE)),
                     int(x - s * (1 + CROP_SCALE)):int(x + s * (1 + CROP_SCALE))]
        out.append(F.interpolate(face[None], size=(SYNCNET_SIZE, SYNCNET_SIZE), mode="bilinear",
                                 align_corners=False)[0].permute(1, 2, 0))
    return torch.stack(out)


def lse_from_network(frames: torch.Tensor, wav: np.ndarray, sr: int, fps: float, network: SyncNet,
                     device: str = "cpu", vshift: int = SYNCNET_VSHIFT, batch: int = 20) -> dict:
    """LSE-D, LSE-C and the offset for IMAGE frames [N, H, W, 3] 0..1 and a mono waveform, with any SyncNet-shaped
    network (see the module docstring for the recipe)."""
    if abs(fps - SYNCNET_FPS) > 1e-3:
        raise MetricSkipped(f"SyncNet's recipe is defined at 25 fps; the video is {fps:g} fps (resample it first)")
    audio = resample_np(wav, sr, SYNCNET_SR) * 32768.0
    cepstra = torch.from_numpy(mfcc(audio).T.copy()).float()[None, None]  # [1, 1, 13, T]
    n = min(len(frames), len(audio) // 640) - SYNCNET_WINDOW  # 640 samples = one 25 fps frame at 16 kHz
    if n < 1:
        raise MetricSkipped(f"LSE needs at least {SYNCNET_WINDOW + 1} frames of video and audio")
    video = frames[..., [2, 1, 0]].float().mul(255).permute(0, 3, 1, 2)  # BGR 0..255, as cv2.imread gives
    video = F.interpolate(video, size=(SYNCNET_SIZE, SYNCNET_SIZE), mode="bilinear", align_corners=False)
    video = video.permute(1, 0, 2, 3)[None]  # [1, 3, N, 224, 224]
    lip, aud = [], []
    with torch.no_grad():
        for start in range(0, n, batch):
            idx = range(start, min(n, start + batch))
            lip.append(network.forward_lip(torch.cat([video[:, :, i:i + 5] for i in idx]).to(device)).cpu())
            aud.append(network.forward_aud(torch.cat([cepstra[..., 4 * i:4 * i + 20] for i in idx]).to(device))
                       .cpu())
    lip_feat, aud_feat = torch.cat(lip), torch.cat(aud)
    padded = F.pad(aud_feat, (0, 0, vshift, vshift))
    width = 2 * vshift + 1
    dists = torch.stack([F.pairwise_distance(lip_feat[[i]].expand(width, -1), padded[i:i + width])
                         for i in range(len(lip_feat))])  # [windows, offsets]
    curve = dists.mean(0)
    best = int(torch.argmin(curve))
    return {"lse_d": float(curve[best]), "lse_c": float(curve.median() - curve[best]),
            "syncnet_offset_frames": best - vshift, "syncnet_curve": [float(v) for v in curve]}


def lse(frames: torch.Tensor, wav: np.ndarray, sr: int, fps: float, weights: str, device: str = "cpu",
        boxes: np.ndarray | None = None) -> dict:
    """LSE-D (lower is better, range [0, inf)) and LSE-C (higher is better, [0, inf)) with syncnet_v2.model, plus
    "syncnet_offset_frames" and "syncnet_curve" (see lse_from_network). With face `boxes` the frames are cropped as
    the recipe does (face_crops) first."""
    if boxes is not None:
        frames = face_crops(frames, boxes)
    return lse_from_network(frames, wav, sr, fps, load_syncnet(weights, device), device)
