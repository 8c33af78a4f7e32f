"""The timeline and the .mp4 muxer: exact frame rates, audio fitted to the frames, streams that players accept,
and partial output kept when encoding stops early."""
from fractions import Fraction

import av as pyav
import pytest
import torch

from narrate_model import av
from narrate_model.errors import NarrateInputError


def probe(path):
    with pyav.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        return {"frames": sum(1 for _ in c.decode(video=0)), "rate": v.average_rate, "size": (v.width, v.height),
                "video_s": float(v.duration * v.time_base), "codec": v.codec_context.name,
                "audio_s": float(a.duration * a.time_base) if a else None,
                "audio_codec": a.codec_context.name if a else None, "channels": a.channels if a else None}


def test_fps_is_kept_exact():
    assert av.exact_fps(25.0) == 25
    assert av.exact_fps("30000/1001") == Fraction(30000, 1001)
    assert av.exact_fps(30000 / 1001) == Fraction(30000, 1001)
    assert av.exact_fps(29.97) == Fraction(2997, 100)
    with pytest.raises(NarrateInputError, match="fps"):
        av.exact_fps(0)


def test_frame_count_is_ceil_of_seconds_times_fps():
    assert av.frame_count(24000, 24000, 25) == 25
    assert av.frame_count(24001, 24000, 25) == 26
    assert av.frame_count(48000 * 10, 48000, "30000/1001") == 300  # 299.7 -> 300
    assert av.samples_for_frames(300, 48000, "30000/1001") == 480480


def test_audio_is_padded_or_trimmed_to_the_frames():
    wav = torch.ones(2, 1000)
    assert av.fit_audio(wav, 1000, 25, 25).shape == (2, 1000)
    assert av.fit_audio(wav, 1000, 10, 25).shape == (2, 400)
    padded = av.fit_audio(wav, 1000, 50, 25)
    assert padded.shape == (2, 2000) and padded[:, 1000:].abs().sum() == 0


@pytest.mark.parametrize("fps, channels", [(25, 1), ("30000/1001", 2)])
def test_mp4_has_h264_and_aac_with_durations_within_a_frame(tmp_path, fps, channels):
    frames = torch.rand(37, 64, 96, 3)
    wav = 0.3 * torch.sin(torch.arange(24000 * 2) / 7.0).repeat(channels, 1)  # 2 s of audio for ~1.5 s of video
    out = av.write_mp4(str(tmp_path / "a.mp4"), frames, fps, wav, 24000, chunk=8)
    info = probe(out)
    assert info["codec"] == "h264" and info["audio_codec"] == "aac" and info["channels"] == channels
    assert info["frames"] == 37 and info["rate"] == av.exact_fps(fps)
    assert abs(info["video_s"] - info["audio_s"]) <= 1 / float(av.exact_fps(fps))


def test_odd_sizes_greyscale_and_silent_video(tmp_path):
    info = probe(av.write_mp4(str(tmp_path / "b.mp4"), torch.rand(5, 33, 47, 1), 25))
    assert info["frames"] == 5 and info["size"] == (48, 34) and info["audio_s"] is None


def test_streamed_chunks_and_progress(tmp_path):
    seen = []
    chunks = (torch.rand(4, 32, 32, 3) for _ in range(5))
    av.write_mp4(str(tmp_path / "c.mp4"), chunks, 25, total_frames=20, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(n, 20) for n in range(1, 21)]
    assert probe(tmp_path / "c.mp4")["frames"] == 20


class Cancelled(Exception):
    pass


def cancel_at_8(done, total):
    if done >= 8:
        raise Cancelled()


def test_cancel_removes_the_unfinished_file_and_says_so(tmp_path):
    with pytest.raises(Cancelled) as info:
        av.write_mp4(str(tmp_path / "d.mp4"), torch.rand(20, 32, 32, 3), 25, torch.zeros(1, 24000), 24000, chunk=4,
                     progress=cancel_at_8)
    assert list(tmp_path.iterdir()) == []  # neither the video nor its .partial twin
    assert info.value.__notes__ == ["the unfinished video d.mp4 was removed after 8 of 20 frames; no video was saved"]


def test_a_failing_frame_source_removes_the_unfinished_file(tmp_path):
    def frames():
        yield torch.rand(4, 32, 32, 3)
        raise MemoryError("decoder ran out of memory")

    with pytest.raises(MemoryError) as info:
        av.write_mp4(str(tmp_path / "f.mp4"), frames(), 25, torch.zeros(1, 24000), 24000, total_frames=20)
    assert list(tmp_path.iterdir()) == [] and "after 4 of 20 frames" in info.value.__notes__[0]


def test_the_writer_never_replaces_a_file(tmp_path):
    existing = tmp_path / "g.mp4"
    existing.write_bytes(b"the user's earlier video")
    with pytest.raises(FileExistsError, match="never replaces"):
        av.write_mp4(str(existing), torch.rand(2, 32, 32, 3), 25)
    assert existing.read_bytes() == b"the user's earlier video"
    (tmp_path / "h.partial.mp4").write_bytes(b"another writer's unfinished file")
    with pytest.raises(FileExistsError):
        av.write_mp4(str(tmp_path / "h.mp4"), torch.rand(2, 32, 32, 3), 25)


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "i.mp4"

    def frames():
        yield torch.rand(2, 32, 32, 3)
        target.write_bytes(b"written meanwhile")

    with pytest.raises(FileExistsError):
        av.write_mp4(str(target), frames(), 25, total_frames=2)
    assert target.read_bytes() == b"written meanwhile" and list(tmp_path.iterdir()) == [target]


def test_no_frames_is_a_clear_error(tmp_path):
    with pytest.raises(NarrateInputError, match="images"):
        av.write_mp4(str(tmp_path / "e.mp4"), torch.rand(0, 32, 32, 3), 25)


def test_streaming_decodes_chunk_by_chunk(tmp_path):
    latents = torch.rand(21, 4, 8, 8)
    calls = []

    def decode(x):
        calls.append(x.shape[0])
        return x[:, :3].permute(0, 2, 3, 1).repeat_interleave(4, 1).repeat_interleave(4, 2)

    wav = torch.zeros(1, 16000)
    av.stream_latents_to_mp4(str(tmp_path / "s.mp4"), latents, decode, 25, wav, 16000, chunk=8)
    assert calls == [8, 8, 5]
    info = probe(tmp_path / "s.mp4")
    assert info["frames"] == 21 and info["size"] == (32, 32)
    assert abs(info["video_s"] - info["audio_s"]) <= 1 / 25
