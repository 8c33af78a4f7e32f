"""Hallo's image side: the 512x512 portrait, its face / lip boxes, the blurred region masks and the face-locator input.

Hallo (`ImageProcessor.preprocess` + `utils.util.get_mask`) runs MediaPipe's FaceLandmarker on the source image,
boxes the lips (x2.0) and the face silhouette (x1.2, `face_expand_ratio`), blurs both boxes at 64x64 and resizes the
blurred masks to the four UNet resolutions, and resizes the whole image to 512x512. Hallo expects a square portrait
whose face fills 50-70 % of it; other images are squashed by that resize. We therefore first cut a square around
the face (see `square_around_face`) and then apply Hallo's steps to that 512x512 square, exactly as Hallo would to a
square input: a square portrait with a large face is used whole, as Hallo uses it.

OpenCV (`cv2`, installed with mediapipe) does the 64x64 resize, Gaussian blur and min-max normalisation, so the
masks equal Hallo's bit for bit; PIL does the bilinear antialiased resizes torchvision's `Resize` does on PIL images.
cv2 is imported where it is used, so ComfyUI's start does not load OpenCV.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, NarrateInputError
from .identity import identity_embedding

SIZE = 512
LIP_IDS = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375]
SILHOUETTE_IDS = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
                  148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
LIP_EXPAND_RATIO = 2.0
FACE_EXPAND_RATIO = 1.2  # default.yaml face_expand_ratio
BLUR_SIZE = 64  # Hallo blurs at 64x64 whatever the image size
FACE_BLUR_KERNEL, LIP_BLUR_KERNEL = 51, 31
FACE_SHARE = 0.5  # the face silhouette's longer side spans at least this share of the square (Hallo: 50-70 %)
DETECT_MAX_SIDE = 1280  # larger images are landmarked on a downscaled copy
MAX_FACES = 8
MIN_SIDE = 32


@dataclass
class FaceMasks:
    face_box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 / y1 exclusive, in the size x size image
    lip_box: tuple[int, int, int, int]
    face_region: np.ndarray  # uint8 [size, size], 255 inside face_box (Hallo's face_mask.png)
    lip_region: np.ndarray  # uint8 [size, size], 255 inside lip_box (lip_mask.png)
    blurred: dict[str, np.ndarray]  # uint8 [64, 64]: "face_blur", "full" (background), "face", "lip"
    masks: dict[str, dict[int, torch.Tensor]]  # {"full" | "face" | "lip": {size//8 .. size//64: [1, HW] in 0..1}}

    @property
    def face_locator_input(self) -> torch.Tensor:
        """[3, size, size] in {0, 1}: the binary face box, the FaceLocator's input."""
        return torch.from_numpy(self.face_region).float().div(255).expand(3, -1, -1).contiguous()


@dataclass
class FaceEncoding:
    pixels: torch.Tensor  # [3, 512, 512] in [-1, 1] (Hallo's pixel_values_ref_img)
    landmarks: np.ndarray  # [478, 2] float64, pixels of the 512 crop
    face_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) exclusive, in the 512 crop
    lip_box: tuple[int, int, int, int]
    face_locator_input: torch.Tensor  # [3, 512, 512] in {0, 1}
    masks: dict[str, dict[int, torch.Tensor]]  # {"full" | "face" | "lip": {64, 32, 16, 8: [1, HW]}}
    identity: torch.Tensor | None  # [512] raw ArcFace embedding; None: use zeros, Hallo's own no-face fallback
    faces_found: int
    notes: list[str] = field(default_factory=list)
    crop: tuple[int, int, int] = (0, 0, 0)  # (x, y, side) of the square taken from the input image
    blurred: dict[str, np.ndarray] = field(default_factory=dict)  # the 64x64 uint8 masks the levels come from
    reference_latent: torch.Tensor | None = None  # [1, 4, s/8, s/8] unscaled VAE latent, added by the VAE stage

    def image(self, size: int = SIZE) -> torch.Tensor:
        """The square portrait as an IMAGE [1, size, size, 3] in 0..1 (what the VAE encodes)."""
        pixels = self.pixels.add(1).div(2)
        if size != SIZE:
            pixels = torch.from_numpy(_resize_u8(pixels.mul(255).round().byte().permute(1, 2, 0).numpy(), size))
            return pixels.float().div(255)[None]
        return pixels.permute(1, 2, 0)[None].contiguous()

    def sampler_inputs(self, size: int) -> "FaceInputs":
        """Hallo's ImageProcessor outputs at a video size of `size` pixels: the face-locator image resized (PIL
        bilinear, so no longer binary below 512), and the region masks at size/8 .. size/64."""
        from .sampler import FaceInputs

        region = self.face_locator_input
        if size != SIZE:
            region_u8 = self.face_locator_input[0].mul(255).round().byte().numpy()
            region = torch.from_numpy(_resize_u8(region_u8, size)).float().div(255).expand(3, -1, -1)
        levels = {name: _levels(self.blurred[name], size) for name in ("full", "face", "lip")} \
            if size != SIZE or not self.masks else self.masks
        order = sorted(levels["full"], reverse=True)
        embedding = self.identity if self.identity is not None else torch.zeros(512)
        return FaceInputs(embedding=embedding, region=region.contiguous(),
                          full_masks=[levels["full"][s] for s in order], face_masks=[levels["face"][s] for s in order],
                          lip_masks=[levels["lip"][s] for s in order])


def _resize_u8(array: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize on a PIL image: PIL bilinear with antialias."""
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR)).copy()


def _expand_axis(lo: float, hi: float, limit: int, ratio: float) -> tuple[int, int]:
    """One axis of Hallo's expand_region: grow about the floored centre, then shift back inside [0, limit]."""
    mid, half = (lo + hi) // 2, ((hi - lo) * ratio) // 2
    lo, hi = mid - half, mid + half
    if lo < 0:
        lo, hi = 0, hi - lo
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    # Hallo would slice from a negative start (wrapping around) when the box outgrows the image; clamp instead.
    return max(round(lo), 0), round(hi)


def landmark_box(landmarks: np.ndarray, ids: list[int], ratio: float, size: int) -> tuple[int, int, int, int]:
    points = landmarks[ids]
    lo, hi = np.round(points.min(0)), np.round(points.max(0))
    x0, x1 = _expand_axis(float(lo[0]), float(hi[0]), size, ratio)
    y0, y1 = _expand_axis(float(lo[1]), float(hi[1]), size, ratio)
    return x0, y0, x1, y1


def _box_region(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    region = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    region[y0:y1, x0:x1] = 255
    return region


def _blur(region: np.ndarray, kernel: int) -> np.ndarray:
    """Hallo's get_blur_mask: bilinear resize to 64x64, Gaussian blur (sigma from the kernel), min-max to 0..255."""
    import cv2

    small = cv2.resize(region, (BLUR_SIZE, BLUR_SIZE))
    return cv2.normalize(cv2.GaussianBlur(small, (kernel, kernel), 0), None, 0, 255, cv2.NORM_MINMAX)


def _levels(mask: np.ndarray, size: int) -> dict[int, torch.Tensor]:
    """torchvision Resize((s, s)) + ToTensor on the PIL 'L' mask, flattened to [1, s*s], for s = size/8 .. size/64."""
    image = Image.fromarray(mask)
    out = {}
    for s in (size // 8, size // 16, size // 32, size // 64):
        resized = np.asarray(image.resize((s, s), Image.BILINEAR))
        out[s] = torch.from_numpy(resized.copy()).float().div(255).view(1, -1)
    return out


def masks_from_landmarks(landmarks: np.ndarray, size: int = SIZE,
                         face_expand_ratio: float = FACE_EXPAND_RATIO) -> FaceMasks:
    """Hallo's boxes and masks from 478 landmarks (pixels of a size x size image)."""
    landmarks = np.asarray(landmarks, np.float64)
    lip_box = landmark_box(landmarks, LIP_IDS, LIP_EXPAND_RATIO, size)
    face_box = landmark_box(landmarks, SILHOUETTE_IDS, face_expand_ratio, size)
    face_region, lip_region = _box_region(face_box, size), _box_region(lip_box, size)
    face_blur, lip = _blur(face_region, FACE_BLUR_KERNEL), _blur(lip_region, LIP_BLUR_KERNEL)
    # Hallo's get_background_mask: float64 1 - x/255, scaled back and truncated by astype
    background = ((1.0 - face_blur / 255.0) * 255).astype(np.uint8)
    face = np.clip(face_blur.astype(np.int16) - lip, 0, 255).astype(np.uint8)  # cv2.subtract saturates
    blurred = {"face_blur": face_blur, "full": background, "face": face, "lip": lip}
    masks = {name: _levels(blurred[name], size) for name in ("full", "face", "lip")}
    return FaceMasks(face_box, lip_box, face_region, lip_region, blurred, masks)


def to_rgb_uint8(image: torch.Tensor, notes: list[str]) -> np.ndarray:
    """ComfyUI IMAGE [H,W,C] (or [1,H,W,C]) float 0..1 -> uint8 RGB [H,W,3]; alpha is composited on white."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise NarrateInputError("image", f"got a batch of {image.shape[0]} images; connect one portrait "
                                              "(e.g. pick one with an 'Image From Batch' node)")
        image = image[0]
    if image.dim() != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise NarrateInputError("image", f"expected an image [height, width, channels] with 1-4 channels, got "
                                         f"shape {tuple(image.shape)}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise NarrateInputError("image", f"the image is {image.shape[1]}x{image.shape[0]} pixels; use a portrait "
                                         f"of at least {MIN_SIDE}x{MIN_SIDE} (512x512 or more looks best: the video "
                                         f"is made at 512x512)")
    pixels = image.detach().float().cpu().clamp(0, 1)
    channels = pixels.shape[-1]
    if channels in (2, 4):
        # Transparent areas often hide black or stray colours; white is the neutral studio background.
        alpha = pixels[..., -1:]
        pixels = pixels[..., :-1] * alpha + (1 - alpha)
        if bool((alpha < 1).any()):
            notes.append("the transparent parts of the image were filled with white")
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, 3)
    return pixels.mul(255).round().to(torch.uint8).numpy().copy()


@functools.lru_cache(maxsize=2)
def _landmarker(path: str):
    from mediapipe.tasks.python import BaseOptions, vision

    if not Path(path).is_file():
        raise CheckpointError(f"MediaPipe face landmarker not found at {path}: put face_landmarker.task there")
    options = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=path),
                                           running_mode=vision.RunningMode.IMAGE, num_faces=MAX_FACES)
    try:
        return vision.FaceLandmarker.create_from_options(options)
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a MediaPipe face landmarker bundle: {error}") from error


def detect_landmarks(landmarker, rgb: np.ndarray) -> list[np.ndarray]:
    """Every face's 478 landmarks [478, 2] in pixels of `rgb`, as Hallo: [x * width, y * height]."""
    import cv2
    import mediapipe as mp

    height, width = rgb.shape[:2]
    scale = DETECT_MAX_SIDE / max(height, width)
    if scale < 1:  # MediaPipe looks at the face at <= 256 px anyway; a smaller copy is faster
        rgb = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
    # Normalised coordinates map back to the full-size image directly.
    return [np.array([[p.x * width, p.y * height] for p in face], np.float64) for face in result.face_landmarks]


def _silhouette_extent(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points = landmarks[SILHOUETTE_IDS]
    return points.min(0), points.max(0)


def square_around_face(landmarks: np.ndarray, width: int, height: int) -> tuple[int, int, int]:
    """(x, y, side) of the square to animate: centred on the face, as large as the image allows, but tight enough
    that the face silhouette spans at least FACE_SHARE of it; shifted to stay inside the image."""
    lo, hi = _silhouette_extent(landmarks)
    side = min(width, height, max(MIN_SIDE, math.ceil(float((hi - lo).max()) / FACE_SHARE)))
    centre = (lo + hi) / 2
    x = int(np.clip(round(centre[0] - side / 2), 0, width - side))
    y = int(np.clip(round(centre[1] - side / 2), 0, height - side))
    return x, y, side


def _area(landmarks: np.ndarray) -> float:
    lo, hi = _silhouette_extent(landmarks)
    return float(np.prod(hi - lo))


def encode_face(image: torch.Tensor, landmarker_path: str | Path,
                identity_model_path: str | Path | None = None) -> FaceEncoding:
    """Everything Hallo derives from the portrait, for an IMAGE [H,W,C] float 0..1 of any size."""
    notes: list[str] = []
    rgb = to_rgb_uint8(image, notes)
    height, width = rgb.shape[:2]
    landmarker = _landmarker(str(landmarker_path))
    faces = detect_landmarks(landmarker, rgb)
    if not faces:
        raise NarrateInputError("image", "no face found in the portrait; use a portrait where the face is clearly "
                                         "visible, frontal (turned less than 30 degrees), well lit and fills about "
                                         "half of the picture")
    largest = max(faces, key=_area)
    if len(faces) > 1:
        notes.append(f"{len(faces)} faces found; the largest one is animated")

    x, y, side = square_around_face(largest, width, height)
    crop = rgb[y:y + side, x:x + side]
    if side != SIZE:
        # torchvision Resize on a PIL image = PIL bilinear with antialias
        crop = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.BILINEAR))
    if side < max(width, height):
        notes.append(f"the face was cut out as a {side}x{side} square at ({x}, {y}) and resized to {SIZE}x{SIZE}")

    # Landmark the 512 crop itself, as Hallo landmarks the image it animates; keep the face we chose above.
    expected = (largest - (x, y)) * (SIZE / side)
    candidates = detect_landmarks(landmarker, crop)
    landmarks = min(candidates, key=lambda c: np.abs(c - expected).mean()) if candidates else expected

    masks = masks_from_landmarks(landmarks, SIZE)
    pixels = torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    identity = identity_embedding(crop, landmarks, identity_model_path, notes)
    return FaceEncoding(pixels=pixels, landmarks=landmarks, face_box=masks.face_box, lip_box=masks.lip_box,
                        face_locator_input=masks.face_locator_input, masks=masks.masks, identity=identity,
                        faces_found=len(faces), notes=notes, crop=(x, y, side), blurred=masks.blurred)
