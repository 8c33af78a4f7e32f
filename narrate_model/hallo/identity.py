"""The 512-d face identity embedding Hallo conditions on (insightface antelopev2 `glintr100.onnx`, ArcFace IR-100).

Hallo takes `face["embedding"]` (raw, not L2-normalised) of the largest face insightface finds. insightface aligns
the face by a similarity transform of SCRFD's five keypoints onto the standard ArcFace 112x112 template; we take the
same five points from the MediaPipe landmarks we already have (iris centres, nose tip, mouth corners), so the SCRFD
detector is not needed. Running the network needs onnxruntime, an optional dependency: without it (or without the
model file) there is no embedding, and Hallo's own fallback applies (zeros, i.e. the unconditional face tokens).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

ALIGNED_SIZE = 112
# insightface's arcface_dst: where the five points land in the 112x112 crop (image-left eye first)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
# MediaPipe ids for those points: iris centres (image-left, image-right), nose tip, mouth corners (left, right)
FIVE_POINT_IDS = [468, 473, 1, 61, 291]
# ArcFaceONNX input scaling for PyTorch-exported recognition models such as glintr100 (no Sub/Mul input nodes)
INPUT_MEAN = INPUT_STD = 127.5
FALLBACK = ("the face tokens fall back to Hallo's unconditional ones (imageproj of a zero embedding), so the video "
            "keeps the person's identity less well")


def five_points(landmarks: np.ndarray) -> np.ndarray:
    return np.asarray(landmarks, np.float64)[FIVE_POINT_IDS]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation [2, 3] taking src to dst (Umeyama, as skimage's
    SimilarityTransform.estimate that insightface uses)."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(covariance)
    sign = np.array([1.0, -1.0 if np.linalg.det(covariance) < 0 else 1.0])
    rotation = u @ np.diag(sign) @ vt
    scale = float(s @ sign) / src_c.var(0).sum()
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """insightface's norm_crop: the 112x112 ArcFace crop (bilinear warp, black outside the image)."""
    import cv2  # here, not at module level: OpenCV loads when a face is encoded, not when ComfyUI starts

    matrix = similarity_transform(five_points(landmarks), ARCFACE_TEMPLATE)
    return cv2.warpAffine(rgb, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), borderValue=0.0)


@functools.lru_cache(maxsize=1)
def _session(path: str):
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return onnxruntime.InferenceSession(path, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable models
        raise CheckpointError(f"{path} is not a readable ONNX face-recognition model: {error}") from error


def identity_embedding(rgb: np.ndarray, landmarks: np.ndarray, model_path: str | Path | None,
                       notes: list[str]) -> torch.Tensor | None:
    """Raw ArcFace embedding [512] of the face, or None with a note saying why and what is lost."""
    enable = ("install onnxruntime (or onnxruntime-gpu) and select insightface's antelopev2 glintr100.onnx "
              "(non-commercial research licence)")
    if model_path is None:
        notes.append(f"no face-identity model selected: {FALLBACK}; to use it, {enable}")
        return None
    if not Path(model_path).is_file():
        notes.append(f"face-identity model {model_path} not found: {FALLBACK}; to use it, {enable}")
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        notes.append(f"onnxruntime is not installed, so no face-identity embedding: {FALLBACK}; to use it, {enable}")
        return None
    session = _session(str(model_path))
    aligned = align_face(rgb, landmarks).astype(np.float32)
    # cv2.dnn.blobFromImage(swapRB=True) on insightface's BGR input hands the network RGB, NCHW
    blob = ((aligned - INPUT_MEAN) / INPUT_STD).transpose(2, 0, 1)[None]
    output = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(blob)})[0]
    embedding = torch.from_numpy(np.asarray(output, np.float32).reshape(-1).copy())
    if embedding.numel() != 512:
        raise CheckpointError(f"{model_path} gives a {embedding.numel()}-d embedding; Hallo needs glintr100's 512-d")
    return embedding
