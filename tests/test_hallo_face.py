"""Hallo image side: face locator / identity projection vs io_unet, masks vs io_masks, landmarks on real portraits."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES, MEDIA
from narrate_model.errors import NarrateInputError
from narrate_model.hallo.face import FaceEncoding, encode_face, masks_from_landmarks
from narrate_model.hallo.identity import (
    ARCFACE_TEMPLATE, align_face, five_points, identity_embedding, similarity_transform)
from narrate_model.hallo.projections import FaceLocator, ImageProjModel

HALLO = FIXTURES / "hallo"


def tiny_part(prefix: str) -> dict:
    with safe_open(HALLO / "tiny_net.safetensors", "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def manifest_part(prefix: str) -> dict:
    rows = (line.split("\t") for line in (HALLO / "manifest_net.tsv").read_text().splitlines())
    return {r[0][len(prefix):]: list(json.loads(r[1])) for r in rows if r[0].startswith(prefix)}


@pytest.fixture(scope="module")
def io_unet():
    return load_file(HALLO / "io_unet.safetensors")


def test_full_size_keys_and_shapes_match_net_pth():
    tiny = json.loads((HALLO / "tiny_config.json").read_text())["full_size_values"]
    with torch.device("meta"):
        locator = FaceLocator(tiny["face_locator"]["conditioning_embedding_channels"],
                              block_out_channels=tiny["face_locator"]["block_out_channels"])
        imageproj = ImageProjModel(**tiny["imageproj"])
    for module, prefix in ((locator, "face_locator."), (imageproj, "imageproj.")):
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert ours == manifest_part(prefix)


def test_face_tokens_and_face_locator_match_io_unet(io_unet):
    cfg = json.loads((HALLO / "tiny_config.json").read_text())
    imageproj = ImageProjModel(**cfg["imageproj"]).eval()
    imageproj.load_state_dict(tiny_part("imageproj."), strict=True)
    locator = FaceLocator(cfg["face_locator"]["conditioning_embedding_channels"],
                          block_out_channels=cfg["face_locator"]["block_out_channels"]).eval()
    locator.load_state_dict(tiny_part("face_locator."), strict=True)
    with torch.no_grad():
        face = io_unet["in.face_emb"]
        tokens, uncond = imageproj(face), imageproj(torch.zeros_like(face))
        frames = io_unet["in.noisy_latents"].shape[2]
        video_mask = io_unet["in.face_mask_pixels"].unsqueeze(2).repeat(1, 1, frames, 1, 1)
        located = locator(video_mask)
    for run in ("cfg", "nocfg"):
        torch.testing.assert_close(tokens, io_unet[f"out.{run}.face_tokens"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(uncond, io_unet[f"out.{run}.face_tokens_uncond"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(located, io_unet[f"out.{run}.face_locator_out"], atol=1e-5, rtol=1e-5)


# --- masks and pixels vs io_masks (Hallo's get_mask + ImageProcessor.preprocess on man.jpg) ---------------------


@pytest.fixture(scope="module")
def io_masks():
    return load_file(HALLO / "io_masks.safetensors")


def as_image(path) -> torch.Tensor:
    """A file as ComfyUI's LoadImage gives it: [H,W,C] float32 = uint8 / 255."""
    return torch.from_numpy(np.array(Image.open(path))).float().div(255)


def assert_exact(ours, expected):
    torch.testing.assert_close(torch.as_tensor(np.asarray(ours)).to(expected.dtype), expected, atol=0, rtol=0)


def assert_masks_equal(masks, io_masks):
    for name in ("full", "face", "lip"):
        assert sorted(masks[name]) == [8, 16, 32, 64]
        for size, mask in masks[name].items():
            assert_exact(mask, io_masks[f"{name}_mask_{size}"])


def test_masks_from_stored_landmarks_are_exact(io_masks):
    info = json.loads((HALLO / "io_masks.json").read_text())
    masks = masks_from_landmarks(io_masks["landmarks"].numpy(), size=512)
    x0, x1, y0, y1 = info["face_box"]["expanded_min_x_max_x_min_y_max_y"]
    assert masks.face_box == (x0, y0, x1, y1)
    x0, x1, y0, y1 = info["lip_box"]["expanded_min_x_max_x_min_y_max_y"]
    assert masks.lip_box == (x0, y0, x1, y1)
    assert_exact(masks.lip_region, io_masks["png_lip_mask_u8"])
    assert_exact(masks.blurred["face_blur"], io_masks["png_face_mask_blur_u8"])
    assert_exact(masks.blurred["lip"], io_masks["png_sep_lip_u8"])
    assert_exact(masks.blurred["face"], io_masks["png_sep_face_u8"])
    assert_exact(masks.blurred["full"], io_masks["png_sep_background_u8"])
    assert_exact(masks.face_locator_input * 255, io_masks["face_mask_face_locator_input_u8"].float())
    assert_masks_equal(masks.masks, io_masks)


# --- the whole encoder on real portraits -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encode(face_landmarker_task):
    return lambda image, **kw: encode_face(image, face_landmarker_task, **kw)


def check_encoding(enc: FaceEncoding):
    assert enc.pixels.shape == (3, 512, 512) and enc.pixels.min() >= -1 and enc.pixels.max() <= 1
    assert enc.landmarks.shape == (478, 2)
    (fx0, fy0, fx1, fy1), (lx0, ly0, lx1, ly1) = enc.face_box, enc.lip_box
    assert 0 <= fx0 < fx1 <= 512 and 0 <= fy0 < fy1 <= 512
    assert fx0 <= lx0 < lx1 <= fx1 and fy0 <= ly0 < ly1 <= fy1
    assert set(enc.face_locator_input.unique().tolist()) == {0.0, 1.0}
    assert enc.face_locator_input.shape == (3, 512, 512)
    for name, levels in enc.masks.items():
        assert {s: tuple(m.shape) for s, m in levels.items()} == {64: (1, 4096), 32: (1, 1024), 16: (1, 256),
                                                                  8: (1, 64)}, name
        assert levels[64].max() > 0.5
    assert enc.identity is None and any("onnxruntime" in note for note in enc.notes)


def test_man_jpg_end_to_end_reproduces_hallo(encode, io_masks):
    enc = encode(as_image(MEDIA / "images" / "man.jpg"))
    check_encoding(enc)
    assert enc.crop == (0, 0, 512) and enc.faces_found == 1  # a Hallo-ready square portrait is used whole
    assert np.abs(enc.landmarks - io_masks["landmarks"].numpy()).max() < 1.0  # MediaPipe 0.10.21 vs ours
    assert_exact(enc.pixels, io_masks["pixel_values_ref_img"])
    assert_exact(enc.face_locator_input * 255, io_masks["face_mask_face_locator_input_u8"].float())
    assert_masks_equal(enc.masks, io_masks)


def test_sampler_inputs_at_128_equal_hallos_128_pixel_processor(encode, io_unet):
    """man.jpg -> our encoder -> the FaceLocator image and region masks Hallo's ImageProcessor((128, 128)) made."""
    inputs = encode(as_image(MEDIA / "images" / "man.jpg")).sampler_inputs(128)
    assert_exact(inputs.region, io_unet["in.face_mask_pixels"][0])
    for name in ("full", "face", "lip"):
        for level, size in zip(getattr(inputs, f"{name}_masks"), (16, 8, 4, 2)):
            assert_exact(level, io_unet[f"in.{name}_mask_{size}"])


@pytest.mark.parametrize("name", ["Woman.png", "kid_2.jpg", "oldMan.jpg"])
def test_every_media_portrait(encode, name):
    image = as_image(MEDIA / "images" / name)
    enc = encode(image)
    check_encoding(enc)
    assert enc.faces_found == 1


def test_rgba_greyscale_and_tiny(encode):
    rgb = as_image(MEDIA / "images" / "oldMan.jpg")
    alpha = torch.ones_like(rgb[..., :1])
    alpha[:40] = 0  # a transparent band at the top
    enc = encode(torch.cat([rgb, alpha], -1))
    check_encoding(enc)
    assert any("white" in note for note in enc.notes)
    assert torch.equal(enc.pixels[:, :30], torch.ones_like(enc.pixels[:, :30]))  # composited on white
    grey = rgb.mean(-1, keepdim=True)
    enc = encode(grey)
    check_encoding(enc)
    assert torch.equal(enc.pixels[0], enc.pixels[1]) and torch.equal(enc.pixels[1], enc.pixels[2])
    tiny = torch.nn.functional.interpolate(rgb.permute(2, 0, 1)[None], size=(224, 224), mode="area")
    check_encoding(encode(tiny[0].permute(1, 2, 0)))


def test_huge_portrait_crops_a_square_around_the_face(encode):
    image = Image.open(MEDIA / "images" / "kid_2.jpg").convert("RGB")
    canvas = Image.new("RGB", (1024, 1536), (90, 110, 130))  # 2:3 portrait, face in the upper middle
    canvas.paste(image, (256, 300))
    huge = torch.from_numpy(np.array(canvas.resize((3000, 4500), Image.BILINEAR))).float().div(255)
    enc = encode(huge)
    check_encoding(enc)
    x, y, side = enc.crop
    assert side <= 3000 and 0 <= x <= 3000 - side and 0 <= y <= 4500 - side
    assert any("square" in note for note in enc.notes)
    # the face (pasted at 256..768 x 300..812 on the 1024x1536 canvas) lies inside the crop
    assert x <= 256 * 3000 / 1024 + 200 and x + side >= 768 * 3000 / 1024 - 200
    assert y <= 300 * 4500 / 1536 + 200 and y + side >= 812 * 4500 / 1536 - 200


def test_two_faces_use_the_largest(encode):
    big = Image.open(MEDIA / "images" / "man.jpg").convert("RGB")
    small = Image.open(MEDIA / "images" / "oldMan.jpg").convert("RGB").resize((384, 384), Image.BILINEAR)
    canvas = Image.new("RGB", (896, 512), (128, 128, 128))
    canvas.paste(small, (0, 64))
    canvas.paste(big, (384, 0))
    enc = encode(torch.from_numpy(np.array(canvas)).float().div(255))
    check_encoding(enc)
    assert enc.faces_found == 2 and any("2 faces" in note for note in enc.notes)
    assert enc.crop[0] >= 384 - 64  # the square sits on the larger (right-hand) face


def test_no_face_is_a_user_error(encode):
    with pytest.raises(NarrateInputError, match="no face found.*frontal"):
        encode(torch.full((256, 256, 3), 0.5))
    with pytest.raises(NarrateInputError, match="batch of 2"):
        encode(torch.zeros(2, 64, 64, 3))


# --- identity (ArcFace alignment; the ONNX network only where onnxruntime is installed) ---------------------------

def test_similarity_transform_recovers_a_known_pose():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -12.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    matrix = similarity_transform(src, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(src @ matrix[:, :2].T + matrix[:, 2], ARCFACE_TEMPLATE, atol=1e-9)


def test_alignment_puts_the_eyes_on_the_arcface_template(io_masks):
    landmarks = io_masks["landmarks"].numpy()
    points = five_points(landmarks)
    assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]  # image-left eye / mouth corner first
    matrix = similarity_transform(points, ARCFACE_TEMPLATE)
    mapped = points @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 4.0  # a frontal face fits the template within a few pixels
    rgb = np.array(Image.open(MEDIA / "images" / "man.jpg").convert("RGB"))
    aligned = align_face(rgb, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8 and aligned.std() > 10


def test_identity_without_model_or_onnxruntime_falls_back_with_a_note(io_masks, tmp_path):
    notes = []
    rgb = np.zeros((512, 512, 3), np.uint8)
    assert identity_embedding(rgb, io_masks["landmarks"].numpy(), None, notes) is None
    assert identity_embedding(rgb, io_masks["landmarks"].numpy(), tmp_path / "glintr100.onnx", notes) is None
    assert len(notes) == 2 and all("unconditional" in note and "onnxruntime" in note for note in notes)


def test_identity_through_onnxruntime(io_masks, tmp_path):
    import onnx  # test requirements (tests/install.sh): a missing one fails, it is not skipped
    import onnxruntime  # noqa: F401
    from onnx import TensorProto, helper, numpy_helper

    # A stand-in for glintr100.onnx with its interface: [1,3,112,112] float -> [1,512]
    weight = np.random.default_rng(0).normal(0, 0.01, (3 * 112 * 112, 512)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input.1"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["683"])],
        "arcface_stand_in", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])], [numpy_helper.from_array(weight, "w")])
    model_path = tmp_path / "glintr100.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(model_path))

    landmarks = io_masks["landmarks"].numpy()
    rgb = np.array(Image.open(MEDIA / "images" / "man.jpg").convert("RGB"))
    notes = []
    embedding = identity_embedding(rgb, landmarks, model_path, notes)
    blob = (align_face(rgb, landmarks).astype(np.float32) - 127.5) / 127.5
    expected = blob.transpose(2, 0, 1).reshape(1, -1) @ weight
    assert notes == [] and embedding.shape == (512,)
    np.testing.assert_allclose(embedding.numpy(), expected[0], atol=1e-4, rtol=1e-4)


def test_the_smallest_image_message_states_the_real_limit(encode):
    from narrate_model.hallo.face import MIN_SIDE

    with pytest.raises(NarrateInputError, match=f"at least {MIN_SIDE}x{MIN_SIDE}"):
        encode(torch.rand(MIN_SIDE - 1, 200, 3))
    with pytest.raises(NarrateInputError, match="no face found"):  # one pixel more passes the size check
        encode(torch.full((MIN_SIDE, 200, 3), 0.5))
