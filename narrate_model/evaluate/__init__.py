"""Evaluation metrics for speech, talking-face video and lip sync (no ComfyUI imports).

Families: `signal` (PSNR, SSIM), `speech` (STOI/ESTOI, PESQ, MCD-DTW, WER/CER, SIM), `video` (Frechet distance,
FID, FVD, LPIPS), `sync` (the landmark lip-sync PROXY) and `syncnet` (LSE-C/LSE-D). `suite` runs every applicable
metric on one sample and turns problems into notes.
"""
from .base import METRICS, Audio, MetricInfo, MetricModels, MetricReport, MetricSkipped
from .suite import evaluate_speech, evaluate_sync, evaluate_video

__all__ = ["METRICS", "Audio", "MetricInfo", "MetricModels", "MetricReport", "MetricSkipped", "evaluate_speech",
           "evaluate_sync", "evaluate_video"]
