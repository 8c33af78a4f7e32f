"""What every metric family shares: the audio type, the metric catalogue, the model settings and the report."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

Audio = tuple[torch.Tensor, int]  # (waveform [T] or [C, T] float, sample_rate); mono-mixed internally


@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str
    reference: str      # the paper and/or the reference implementation our code is checked against
    range: str
    better: str         # "higher" | "lower"


def _info(name, description, reference, range_, better):
    return MetricInfo(name, description, reference, range_, better)


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    _info("psnr", "peak signal-to-noise ratio of frames (0..1 pixels), mean over frames",
          "skimage.metrics.peak_signal_noise_ratio", "[0, inf) dB; inf for identical frames", "higher"),
    _info("ssim", "structural similarity, Gaussian window sigma 1.5, per channel, mean over frames",
          "Wang et al. 2004; skimage.metrics.structural_similarity(gaussian_weights=True)", "[-1, 1]", "higher"),
    _info("lpips", "learned perceptual distance (AlexNet features + LPIPS v0.1 linear heads), mean over frames",
          "Zhang et al. 2018, richzhang/PerceptualSimilarity", "[0, ~1]", "lower"),
    _info("fid", "Frechet distance of Inception-v3 pool3 features (2048-d) of all frames",
          "Heusel et al. 2017; mseitzer/pytorch-fid", "[0, inf)", "lower"),
    _info("fvd", "Frechet distance of I3D (Kinetics-400) features of 16-frame clips",
          "Unterthiner et al. 2018", "[0, inf)", "lower"),
    _info("stoi", "short-time objective intelligibility", "Taal et al. 2011; pystoi", "[0, 1] (roughly)", "higher"),
    _info("estoi", "extended STOI", "Jensen & Taal 2016; pystoi(extended=True)", "[0, 1] (roughly)", "higher"),
    _info("pesq_wb", "PESQ wide band (ITU-T P.862.2) at 16 kHz, MOS-LQO", "ITU-T P.862.2; the pesq package",
          "[1.04, 4.64]", "higher"),
    _info("pesq_nb", "PESQ narrow band (ITU-T P.862 + P.862.1 mapping) at 8 kHz, MOS-LQO",
          "ITU-T P.862; the pesq package", "[1.02, 4.55]", "higher"),
    _info("mcd", "mel-cepstral distortion after DTW alignment, c1..c24 (c0 excluded)",
          "Kubichek 1993; the MCD-DTW recipe", "[0, inf) dB", "lower"),
    _info("wer", "word error rate of a Whisper transcript against the text, after normalisation",
          "faster-whisper (Whisper tiny.en by default)", "[0, inf); 0 is perfect", "lower"),
    _info("cer", "character error rate of a Whisper transcript against the text, after normalisation",
          "faster-whisper (Whisper tiny.en by default)", "[0, inf); 0 is perfect", "lower"),
    _info("sim", "cosine similarity of speaker embeddings (resemblyzer GE2E encoder)",
          "Wan et al. 2018; resemble-ai/Resemblyzer", "[-1, 1] (>= 0 for resemblyzer)", "higher"),
    _info("lse_d", "lip-sync error distance: mean SyncNet embedding distance at the best offset",
          "Prajwal et al. 2020 (Wav2Lip evaluation); joonson/syncnet_python", "[0, inf)", "lower"),
    _info("lse_c", "lip-sync error confidence: median minus minimum of the SyncNet distance over offsets",
          "Prajwal et al. 2020 (Wav2Lip evaluation); joonson/syncnet_python", "[0, inf)", "higher"),
    _info("lipsync_proxy_corr", "PROXY, not LSE: peak correlation between mouth opening (MediaPipe landmarks) "
          "and the speech envelope over a lag search", "this pack (narrate_model.evaluate.sync)", "[-1, 1]",
          "higher"),
)}


@dataclass
class MetricModels:
    """Where the model-backed metrics find their weights; a missing one skips its metrics with a note."""

    whisper_dir: str | None = None                # faster-whisper (CTranslate2) model folder -> WER/CER
    speaker_encoder: str | None = "resemblyzer"   # "resemblyzer" (weights in its wheel) or None -> SIM
    inception: str | None = None                  # FID weights file (registry)
    i3d: str | None = None                        # FVD weights file (registry)
    lpips: str | None = None                      # LPIPS weights (registry)
    syncnet: str | None = None                    # SyncNet weights (registry) -> LSE-C/LSE-D
    landmarker: str | None = None                 # MediaPipe face_landmarker.task -> lip-sync proxy
    device: str = "cpu"


@dataclass
class MetricReport:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def weights_help(key: str) -> str:
    """Which registry file a metric needs and how to get it (narrate_model.weights)."""
    from ..weights import resolve

    entry = resolve(key)[0]
    how = (f"fetch it with python -m narrate_model download {entry.bundle}" if entry.sha256 else
           f"it has no published checksum, so download {entry.public_url()} by hand")
    return f"it needs {entry.title} at <ComfyUI models>/{entry.dest}: {how}"


class MetricSkipped(Exception):
    """A metric cannot be computed for this sample (missing model, silent input, ...): the message becomes a note."""


def mono(audio: Audio, name: str) -> tuple[np.ndarray, int]:
    """(float64 mono waveform [T], sample rate) from a waveform [T], [C, T] or [1, C, T] (ComfyUI AUDIO)."""
    wav, sr = audio
    wav = torch.as_tensor(wav).detach().to("cpu", torch.float64)
    while wav.dim() > 2:
        if wav.shape[0] != 1:
            raise MetricSkipped(f"{name}: expected one waveform, got a batch of shape {tuple(wav.shape)}")
        wav = wav[0]
    if wav.dim() == 2:
        wav = wav.mean(0)
    if int(sr) <= 0:
        raise MetricSkipped(f"{name}: invalid sample rate {sr}")
    return wav.numpy(), int(sr)


def finite_or_note(values: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    """NaN / inf samples replaced by 0, with a note (a metric then still runs on the rest)."""
    bad = ~np.isfinite(values)
    if bad.any():
        notes.append(f"{name}: {int(bad.sum())} NaN/inf values were replaced by 0")
        values = np.where(bad, 0.0, values)
    return values


def run_metric(report: MetricReport, names, compute) -> None:
    """Run `compute()` -> {name: value} (or a float for one name) and store it; a skip or a numerical failure becomes
    a note, never an exception, so one bad metric does not stop the others."""
    names = (names,) if isinstance(names, str) else tuple(names)
    try:
        result = compute()
    except MetricSkipped as why:
        report.notes.append(f"{'/'.join(names)} skipped: {why}")
        return
    except (ValueError, RuntimeError, FloatingPointError, OSError, EOFError) as error:  # incl. a corrupt weights file
        report.notes.append(f"{'/'.join(names)} failed: {type(error).__name__}: {error}")
        return
    if not isinstance(result, dict):
        result = {names[0]: result}
    for key, value in result.items():
        value = float(value)
        if math.isnan(value):
            report.notes.append(f"{key} is NaN for this sample")
        report.values[key] = value
