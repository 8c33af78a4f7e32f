"""Reference-based frame metrics: PSNR and SSIM on ComfyUI IMAGE batches [N, H, W, C] float 0..1.

Both are computed in float64 and checked against scikit-image (tests/test_evaluate_signal.py), the implementation
talking-head papers quote.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy's gaussian_filter truncation as skimage uses it: an 11-tap window at sigma 1.5
UNIFORM_WIN = 7      # skimage's default window when gaussian_weights=False


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] (or [H, W, C]) -> float64 [N, C, H, W]."""
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"expected frames [N, H, W, C], got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64).permute(0, 3, 1, 2)


def psnr_frames(generated: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-frame PSNR = 10 log10(R^2 / MSE) in dB over all pixels and channels of a frame; inf where the frames are
    identical. Reference: skimage.metrics.peak_signal_noise_ratio. Higher is better."""
    g, r = _frames(generated), _frames(reference)
    mse = (g - r).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)  # mse 0 -> +inf, as skimage


def psnr(generated: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean per-frame PSNR (dB); range [0, inf), inf when every frame is identical. Higher is better."""
    return float(psnr_frames(generated, reference, data_range).mean())


def _window(gaussian: bool) -> torch.Tensor:
    if gaussian:
        radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 * x.square() / SSIM_SIGMA ** 2)
    else:
        w = torch.ones(UNIFORM_WIN, dtype=torch.float64)
    return w / w.sum()


def _local_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable filter over H and W, 'valid' only: skimage pads and then crops (win-1)/2 pixels on every side, so
    its averaged region never sees the padding and equals a valid convolution."""
    n, c, h, wd = x.shape
    flat = x.reshape(n * c, 1, h, wd)
    flat = F.conv2d(flat, w.view(1, 1, -1, 1))
    flat = F.conv2d(flat, w.view(1, 1, 1, -1))
    return flat.view(n, c, flat.shape[-2], flat.shape[-1])


def ssim_frames(generated: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0,
                gaussian: bool = True) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004): luminance x contrast x structure with C1 = (0.01 R)^2, C2 = (0.03 R)^2,
    local statistics under a Gaussian window (sigma 1.5, population covariance) or, with gaussian=False, a 7x7
    uniform window (sample covariance), computed per channel and averaged. Equals skimage's structural_similarity
    with the same settings (channel_axis=-1). Range [-1, 1], 1 for identical frames; higher is better."""
    g, r = _frames(generated), _frames(reference)
    w = _window(gaussian)
    if min(g.shape[-2:]) < w.numel():
        raise ValueError(f"frames of {g.shape[-1]}x{g.shape[-2]} are smaller than the {w.numel()}-pixel SSIM window")
    npix = w.numel() ** 2
    cov_norm = 1.0 if gaussian else npix / (npix - 1)
    mu_g, mu_r = _local_mean(g, w), _local_mean(r, w)
    var_g = cov_norm * (_local_mean(g * g, w) - mu_g * mu_g)
    var_r = cov_norm * (_local_mean(r * r, w) - mu_r * mu_r)
    cov = cov_norm * (_local_mean(g * r, w) - mu_g * mu_r)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_g * mu_r + c1) * (2 * cov + c2)) / ((mu_g.square() + mu_r.square() + c1) * (var_g + var_r + c2))
    return s.mean(dim=(2, 3)).mean(1)


def ssim(generated: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, gaussian: bool = True) -> float:
    """Mean per-frame SSIM; see ssim_frames."""
    return float(ssim_frames(generated, reference, data_range, gaussian).mean())

