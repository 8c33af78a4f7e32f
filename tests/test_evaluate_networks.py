"""Model-backed metrics without their real weights: the Frechet distance against a float64 reference, FID and FVD
through small stand-in networks, and LPIPS / SyncNet / I3D / FID-Inception loading from files in the registry's
layouts filled with random weights."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluate_media import media_frames, need

from narrate_model.errors import CheckpointError
from narrate_model.evaluate import MetricModels, MetricSkipped, evaluate_sync, evaluate_video, syncnet, video


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (pytorch-fid's): scipy's sqrtm of S1 S2, float64."""
    linalg = need("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_a_float64_reference_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 24))
    b = rng.standard_normal((250, 24)) @ rng.standard_normal((24, 24)) * 0.5 + 0.3
    ours = video.frechet_from_features(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    want = scipy_frechet(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    assert ours == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert video.frechet_from_features(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-9)
    # the guard can fail: a wrong covariance (doubled) is far from the reference
    mu1, s1 = video.feature_statistics(torch.from_numpy(a))
    mu2, s2 = video.feature_statistics(torch.from_numpy(b))
    assert abs(video.frechet_distance(mu1, s1, mu2, 2 * s2) - want) > 1.0


class TinyImageNet(torch.nn.Module):
    """A stand-in for Inception: conv + global pooling to 8 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class TinyClipNet(torch.nn.Module):
    """A stand-in for I3D: 3D conv over [B, 3, T, H, W] + pooling to 6 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv3d(3, 6, (3, 5, 5), stride=(2, 4, 4))

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


def test_fid_and_fvd_code_paths_with_stand_in_networks():
    frames, _ = media_frames("man", 96)
    clean = frames[:64]
    noisy = (clean + 0.2 * torch.randn_like(clean)).clamp(0, 1)
    net = TinyImageNet()
    assert video.fid_from_network(clean, clean, net, size=64) == pytest.approx(0.0, abs=1e-9)
    # noise moves the features further than half a second of the same talking face does (equal counts: 32)
    assert video.fid_from_network(noisy[:32], clean[:32], net, size=64) > \
        video.fid_from_network(clean[32:], clean[:32], net, size=64)
    clip_net = TinyClipNet()
    feats = video.clip_features(clean, clip_net, clip=16, size=32)
    assert feats.shape == (4, 6)  # 64 frames -> four 16-frame clips
    assert video.fvd_from_network(clean, clean, clip_net, clip=8, size=32) == pytest.approx(0.0, abs=1e-9)
    assert video.fvd_from_network(noisy[:32], clean[:32], clip_net, clip=8, size=32) > \
        video.fvd_from_network(clean[32:], clean[:32], clip_net, clip=8, size=32)


def random_state(model: torch.nn.Module, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}


def test_lpips_loads_the_registry_layout_and_scores_identity_zero(tmp_path):
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(video.LPIPS_CHANNELS)}
    trunk = {f"features.{k}": v for k, v in random_state(video.LPIPSAlex().features).items()}
    trunk.update({"classifier.6.bias": torch.zeros(1000)})  # the AlexNet file carries its classifier too
    torch.save(heads, tmp_path / "alex.pth")
    torch.save(trunk, tmp_path / video.ALEXNET_FILE)
    frames, _ = media_frames("man", 96)
    ref = frames[:4]
    models = MetricModels(lpips=str(tmp_path / "alex.pth"))
    same, shifted = evaluate_video(ref, ref, models), evaluate_video(frames[8:12], ref, models)
    assert same.values["lpips"] == 0.0
    assert shifted.values["lpips"] > 0
    # a file in another layout is refused with a message naming what was expected
    torch.save({"lin0.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="LPIPS v0.1 AlexNet"):
        video.load_lpips(str(tmp_path / "wrong.pth"), str(tmp_path / video.ALEXNET_FILE))
    missing = evaluate_video(ref, ref, MetricModels(lpips=str(tmp_path / "none.pth")))
    assert "lpips" not in missing.values and any("does not exist" in n for n in missing.notes)


def test_syncnet_loads_the_registry_layout_and_runs_the_lse_recipe(tmp_path):
    state = random_state(syncnet.SyncNet())
    assert {k.split(".")[0] for k in state} == {"netcnnaud", "netfcaud", "netcnnlip", "netfclip"}
    torch.save(state, tmp_path / "syncnet_v2.model")
    frames, fps = media_frames("kid_1", 64)
    from evaluate_media import media_audio

    wav, sr = media_audio("kid_1")
    report = evaluate_sync(frames[:14], (torch.from_numpy(wav[: int(14 / fps * sr)]), sr), fps,
                           MetricModels(syncnet=str(tmp_path / "syncnet_v2.model")))
    assert {"lse_d", "lse_c"} <= set(report.values), report.notes
    curve = report.extra["syncnet_curve"]
    assert len(curve) == 31 and report.values["lse_d"] == pytest.approx(min(curve))
    assert report.values["lse_c"] == pytest.approx(float(torch.tensor(curve).median()) - min(curve))
    assert any("lipsync_proxy_corr skipped: no MediaPipe face landmarker" in n for n in report.notes)
    # a whole pickled module (what some copies of syncnet_v2.model are) is refused by weights_only loading
    torch.save(syncnet.SyncNet(), tmp_path / "pickled.model")
    with pytest.raises(CheckpointError, match="weights_only"):
        syncnet.load_syncnet(str(tmp_path / "pickled.model"))
    wrong_fps = evaluate_sync(frames[:14], (torch.from_numpy(wav), sr), 30.0,
                              MetricModels(syncnet=str(tmp_path / "syncnet_v2.model")))
    assert any("25 fps" in n for n in wrong_fps.notes)


def test_mfcc_follows_python_speech_features_conventions():
    """13 coefficients every 10 ms with c0 = log frame energy; silence gives log(eps), not -inf."""
    tone = 3000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    feats = syncnet.mfcc(tone)
    assert feats.shape == (1 + int(np.ceil((16000 - 400) / 160)), 13)
    pre = np.append(tone[0], tone[1:] - 0.97 * tone[:-1])
    energy = (np.abs(np.fft.rfft(pre[160:560], 512)) ** 2 / 512).sum()
    assert feats[1, 0] == pytest.approx(np.log(energy))
    assert np.isfinite(syncnet.mfcc(np.zeros(1000))).all()


def test_fid_inception_and_i3d_accept_their_registry_key_layouts(tmp_path):
    """The real files' layouts: pytorch-fid's Inception (torchvision names, 1008 classes, no aux head) and
    pytorch-i3d's InceptionI3d (Unit3D conv3d/bn, logits with bias). Random weights, so only loading and shapes."""
    inception = video.FIDInception()
    state = random_state(inception.net)
    assert "fc.weight" in state and state["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in state)
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = video.load_fid_inception(str(tmp_path / "pt_inception.pth"))
    with torch.no_grad():
        assert loaded(torch.rand(1, 3, 299, 299)).shape == (1, 2048)
    i3d_state = random_state(video.I3D())
    assert "Mixed_5c.b3b.conv3d.weight" in i3d_state and "logits.conv3d.bias" in i3d_state
    torch.save(i3d_state, tmp_path / "rgb_imagenet.pt")
    assert isinstance(video.load_i3d(str(tmp_path / "rgb_imagenet.pt")), video.I3D)
    del i3d_state["logits.conv3d.bias"]
    torch.save(i3d_state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="rgb_imagenet"):
        video.load_i3d(str(tmp_path / "broken.pt"))


def test_a_corrupt_weights_file_is_a_note_and_the_other_metrics_stay():
    frames, _ = media_frames("man", 64)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "alex.pth"
        empty.write_bytes(b"")  # a cut download
        report = evaluate_video(frames[:2], frames[:2], MetricModels(lpips=str(empty)))
    assert "lpips" not in report.values and "psnr" in report.values and "ssim" in report.values
    assert any(n.startswith("lpips failed") for n in report.notes), report.notes


def test_test_set_fid_and_fvd_pool_the_features_of_every_sample():
    """The CLI's test-set FID / FVD: one distance over all samples' features, as papers report them; not the mean of
    per-sample distances (the broken variant below), which is what a per-sample table row gives."""
    frames, _ = media_frames("man", 96)
    samples = [(frames[i:i + 16], (frames[i:i + 16] + 0.1 * torch.randn(16, 96, 96, 3)).clamp(0, 1))
               for i in (0, 16, 32)]
    net, clip_net = TinyImageNet(), TinyClipNet()
    pooled = video.PooledFrechet(net, clip_net, fid_size=64, fvd_size=32, clip=8)
    for gen, ref in samples:
        pooled.add(gen, ref)
    pooled.add(frames[:4], frames[4:8])  # too short for an 8-frame clip: adds FID features only
    values = pooled.values()
    gens, refs = [s[0] for s in samples] + [frames[:4]], [s[1] for s in samples] + [frames[4:8]]
    expected_fid = video.frechet_from_features(video.image_features(torch.cat(gens), net, 64),
                                               video.image_features(torch.cat(refs), net, 64))
    assert values["fid"] == (pytest.approx(expected_fid, rel=1e-6), 52)
    expected_fvd = video.frechet_from_features(
        torch.cat([video.clip_features(g, clip_net, 8, 32) for g, _ in samples]),
        torch.cat([video.clip_features(r, clip_net, 8, 32) for _, r in samples]))
    assert values["fvd"] == (pytest.approx(expected_fvd, rel=1e-6), 6)
    per_sample_mean = sum(video.fid_from_network(g, r, net, 64) for g, r in samples) / len(samples)
    assert abs(per_sample_mean - values["fid"][0]) > 1e-3 * abs(values["fid"][0])
    # the paper-layout table and metrics.json carry the pooled rows next to the per-sample means
    from narrate_model.evaluate import MetricReport
    from narrate_model.evaluate.report import markdown_table, write_all

    reports = {"a": MetricReport(values={"fid": 3.0}), "b": MetricReport(values={"fid": 5.0})}
    table = markdown_table(reports, values)
    assert "| fid | ↓ | 4.000 ± 1.000 | 2 |" in table and "| fid (test set, pooled) |" in table, table
    with tempfile.TemporaryDirectory() as tmp:
        import json

        written = write_all(Path(tmp), reports, values)
        assert json.loads(written["json"].read_text())["test_set"]["fvd"]["n"] == 6


def test_syncnet_face_crop_follows_the_recipe_geometry():
    """syncnet_python's crop_video: rows cy - s .. cy + 1.8 s, columns cx - 1.4 s .. cx + 1.4 s of the frame padded
    with grey 110 (s = half the larger box side, median-filtered over 13 frames), resized to 224."""
    frames = torch.zeros(13, 200, 300, 3)
    frames[:, 80:120, 130:170] = 1.0  # a white 40x40 "face" centred at (150, 100)
    boxes = np.array([[130.0, 80.0, 170.0, 120.0]] * 13)
    crops = syncnet.face_crops(frames, boxes)
    assert crops.shape == (13, 224, 224, 3)
    # s = 20: the crop spans x 122..178 (56 px) and y 80..136 (56 px); the face fills x 8..48, y 0..40 of it
    expected = torch.zeros(56, 56, 3)
    expected[0:40, 8:48] = 1.0
    expected = torch.nn.functional.interpolate(expected.permute(2, 0, 1)[None], size=(224, 224), mode="bilinear",
                                               align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(crops[6], expected)  # the middle frame: its 13-frame filter window is all track
    # a frame without a face takes its neighbours' box; a box at the border reaches into the grey padding
    boxes[6] = np.nan
    boxes[:, [0, 2]] -= 130  # the face box now starts at x = 0
    crops = syncnet.face_crops(frames, boxes)
    assert crops[6, 112, 0].tolist() == pytest.approx([110 / 255] * 3)
    # broken variant: a crop centred on the box (not the recipe's downward-shifted one) misses the expected image
    centred = frames[0, 72:128, 122:178].permute(2, 0, 1)[None]
    centred = torch.nn.functional.interpolate(centred, size=(224, 224), mode="bilinear", align_corners=False)
    assert not torch.allclose(centred[0].permute(1, 2, 0), expected)
    with pytest.raises(MetricSkipped, match="no face"):
        syncnet.face_crops(frames, np.full((13, 4), np.nan))
    with pytest.raises(MetricSkipped, match="at least 13 frames"):
        syncnet.face_crops(frames[:5], boxes[:5])
