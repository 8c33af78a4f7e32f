"""PSNR and SSIM (narrate_model.evaluate.signal) against scikit-image, on random and real frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evaluate_media import media_frames, need

from narrate_model.evaluate import evaluate_video
from narrate_model.evaluate import signal as sig


def skimage_reference(generated: torch.Tensor, reference: torch.Tensor, gaussian: bool) -> tuple[float, float]:
    metrics = need("skimage.metrics")
    psnr, ssim = [], []
    for g, r in zip(generated.double().numpy(), reference.double().numpy()):
        psnr.append(metrics.peak_signal_noise_ratio(r, g, data_range=1.0))
        ssim.append(metrics.structural_similarity(r, g, data_range=1.0, channel_axis=-1, gaussian_weights=gaussian,
                                                  sigma=1.5, use_sample_covariance=not gaussian))
    return float(np.mean(psnr)), float(np.mean(ssim))


def blur(frames: torch.Tensor, size: int = 5) -> torch.Tensor:
    x = frames.permute(0, 3, 1, 2)
    kernel = torch.ones(3, 1, size, size) / size ** 2
    return F.conv2d(F.pad(x, [size // 2] * 4, mode="replicate"), kernel, groups=3).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def real_pair():
    """Frames 0-3 of man.mp4 against frames 2-5: real faces, real small motion."""
    frames, _ = media_frames("man", 160)
    return frames[2:6], frames[:4]


@pytest.mark.parametrize("gaussian", [True, False])
def test_psnr_and_ssim_equal_scikit_image_on_random_and_real_frames(real_pair, gaussian):
    torch.manual_seed(0)
    noisy = torch.rand(3, 37, 45, 3)
    pairs = {"random": (noisy, (noisy + 0.1 * torch.randn_like(noisy)).clamp(0, 1)), "real": real_pair}
    for name, (gen, ref) in pairs.items():
        want_psnr, want_ssim = skimage_reference(gen, ref, gaussian)
        assert sig.psnr(gen, ref) == pytest.approx(want_psnr, abs=1e-6), name
        assert sig.ssim(gen, ref, gaussian=gaussian) == pytest.approx(want_ssim, abs=1e-6), name
    # the guard can fail: SSIM with K2 = 0.02 instead of 0.03 is off by far more than 1e-6
    gen, ref = pairs["real"]
    original = sig.SSIM_K2
    try:
        sig.SSIM_K2 = 0.02
        assert abs(sig.ssim(gen, ref, gaussian=gaussian) - skimage_reference(gen, ref, gaussian)[1]) > 1e-4
    finally:
        sig.SSIM_K2 = original


def test_identical_frames_score_perfect_and_blur_scores_worse(real_pair):
    frames = real_pair[0]
    same = evaluate_video(frames, frames.clone())
    assert same.values["psnr"] == float("inf") and same.values["ssim"] == pytest.approx(1.0, abs=1e-12)
    light, heavy = evaluate_video(blur(frames, 3), frames), evaluate_video(blur(frames, 9), frames)
    assert light.values["psnr"] > heavy.values["psnr"] and light.values["ssim"] > heavy.values["ssim"]
    assert light.values["ssim"] < 1 and light.values["psnr"] < 60  # first step already away from perfect


def test_bad_video_input_gives_notes_not_exceptions(real_pair):
    gen, ref = real_pair
    trimmed = evaluate_video(gen, ref[:3])
    assert any("trimmed to 3" in note for note in trimmed.notes)
    assert trimmed.values["psnr"] == pytest.approx(sig.psnr(gen[:3], ref[:3]))
    with_nan = gen.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    report = evaluate_video(with_nan, ref)
    assert any("NaN" in note for note in report.notes) and np.isfinite(report.values["ssim"])
    sizes = evaluate_video(gen, ref[:, :80])
    assert not sizes.values and any("sizes differ" in note for note in sizes.notes)
    shape = evaluate_video(torch.rand(4, 4), ref)
    assert any("expected an IMAGE batch" in note for note in shape.notes)
