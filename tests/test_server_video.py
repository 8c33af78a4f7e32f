"""The video graph on the real server with small checkpoints in the real layouts: LoadImage -> Face Encode ->
Speech Features (a real clip's audio) -> Video Diffusion Sampler -> VAE Decode -> frames, over more than one clip."""
import io
import math

import av
import numpy as np
import pytest

from comfy_server import messages_of
from conftest import MEDIA
from small_checkpoints import write_hallo, write_landmarker, write_sd_vae, write_wav2vec

FPS = 25


@pytest.fixture(scope="module")
def small_video_models(comfy_server):
    models = comfy_server.base / "models"
    return {"hallo": write_hallo(models), "wav2vec": write_wav2vec(models), "landmarker": write_landmarker(models),
            "vae": write_sd_vae(models)}


def clip_wav(tmp_path, seconds: float) -> "Path":
    """The first `seconds` of man.mp4's speech as a 44.1 kHz stereo WAV (a real clip's audio)."""
    with av.open(str(MEDIA / "videos" / "man.mp4")) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(2, -1) if f.format.is_planar else f.to_ndarray().reshape(-1, 2).T
                              for f in c.decode(audio=0)], axis=1)
        rate = c.streams.audio[0].rate
    pcm = pcm[:, :int(seconds * rate)].astype(np.float32)
    path = tmp_path / f"speech_{seconds}.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray((pcm.T * 32767).astype(np.int16).reshape(1, -1)),
                                           format="s16", layout="stereo")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def video_prompt(m: dict, image: str, audio: str, size: int = 64, steps: int = 2) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": {"class_type": "NFY_FaceEncode",
              "inputs": {"image": ["1", 0], "vae": ["2", 0], "size": size, "landmarker": m["landmarker"]}},
        "4": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "5": {"class_type": "NFY_LoadWav2Vec", "inputs": {"model": m["wav2vec"]}},
        "6": {"class_type": "NFY_SpeechFeatures", "inputs": {"audio": ["4", 0], "wav2vec": ["5", 0], "fps": FPS}},
        "7": {"class_type": "NFY_LoadHallo", "inputs": {"checkpoint": m["hallo"], "motion_module": "none",
                                                       "dtype": "auto"}},
        "8": {"class_type": "NFY_VideoDiffusionSampler",
              "inputs": {"hallo": ["7", 0], "face": ["3", 0], "features": ["6", 0], "vae": ["2", 0],
                         "steps": steps, "cfg": 3.5, "seed": 1, "scheduler": "ddim", "clip_length": 16,
                         "motion_frames": 2, "pose_weight": 1.0, "face_weight": 1.0, "lip_weight": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["2", 0]}},
        "10": {"class_type": "NFY_AVMux", "inputs": {"images": ["9", 0], "audio": ["4", 0], "fps": FPS,
                                                    "filename_prefix": "nfy_test/video", "crf": 19}},
    }


def test_video_graph_gives_one_frame_per_frame_of_audio_across_clips(comfy, small_video_models, tmp_path):
    seconds = 0.9  # 23 frames at 25 fps: two 16-frame clips
    image = comfy.upload(MEDIA / "images" / "man.jpg")
    audio = comfy.upload(clip_wav(tmp_path, seconds))
    prompt = video_prompt(small_video_models, image, audio)
    prompt["11"] = {"class_type": "NFY_BatchedVAEDecode", "inputs": {"samples": ["8", 0], "vae": ["2", 0],
                                                                     "batch_size": 5}}
    prompt["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    with comfy.listen() as ws:
        entry = comfy.run(prompt, timeout=600)
    expected = math.ceil(seconds * FPS)
    with av.open(io.BytesIO(comfy.view(entry["outputs"]["10"]["images"][0]))) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        audio_s = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    assert len(frames) == expected > 16
    assert frames[0].shape == (64, 64, 3)
    assert abs(audio_s - expected / FPS) <= 1 / FPS
    assert len(entry["outputs"]["12"]["images"]) == expected  # the batched decoder gives the same frames
    steps = [m for m in ws.of("progress") if m["node"] == "8"]
    assert steps[-1]["value"] == steps[-1]["max"] == 2 * 2  # 2 clips x 2 steps, one report per step


def test_loader_dropdowns_list_weights_not_their_layout_files(comfy, small_video_models):
    spec = comfy.get_json("/object_info/NFY_LoadHallo")["NFY_LoadHallo"]["input"]["required"]["checkpoint"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combos list their options in the spec
    assert small_video_models["hallo"] in options and "net.pth" not in options  # only files that exist
    assert not any(o.endswith(".json") for o in options)


def test_no_face_is_a_clear_error(comfy, small_video_models, tmp_path):
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    prompt = video_prompt(small_video_models, comfy.upload(grey), comfy.upload(clip_wav(tmp_path, 0.5)))
    entry = comfy.wait(comfy.queue(prompt), expect="error")
    error = messages_of(entry, "execution_error")[0]
    assert error["node_type"] == "NFY_FaceEncode"
    assert "Face Encode" in error["exception_message"] and "no face found" in error["exception_message"]
