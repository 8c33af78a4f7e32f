"""AV Mux: IMAGE frames + AUDIO + fps -> a saved .mp4 (h264 + aac) and a VIDEO for core video nodes."""
from comfy_api.latest import InputImpl, io

from ..narrate_model import av
from .common import CATEGORY, input_errors, output_mp4, progress_bar


class AVMux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_AVMux",
            display_name="AV Mux (frames + audio to .mp4)",
            category=f"{CATEGORY}/output",
            description="Encodes the frames as h264 and the audio as aac into one .mp4 in ComfyUI's output folder. "
                        "The audio is padded with silence or trimmed to the frames' duration, so picture and sound "
                        "stay in sync to within one frame.",
            inputs=[
                io.Image.Input("images", tooltip="The video frames, in order (an IMAGE batch)."),
                io.Audio.Input("audio", optional=True,
                               tooltip="The soundtrack; padded or trimmed to the frames' duration. Leave empty for "
                                       "a silent video."),
                io.Float.Input("fps", default=25.0, min=1.0, max=240.0, step=0.001,
                               tooltip="Frames per second, kept as an exact fraction (29.97 -> 2997/100, "
                                       "29.97003 -> 30000/1001). Hallo was trained at 25."),
                io.String.Input("filename_prefix", default="narrate/video",
                                tooltip="Where the .mp4 goes under ComfyUI's output folder; a counter is added, "
                                        "so earlier videos are never overwritten."),
                io.Int.Input("crf", default=19, min=0, max=51,
                             tooltip="h264 quality: lower is better and bigger; 17-23 is visually lossless to good."),
            ],
            outputs=[io.Video.Output(tooltip="The saved video; plugs into core SaveVideo / GetVideoComponents.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix, crf=19, audio=None) -> io.NodeOutput:
        with input_errors("AV Mux"):
            path, saved = output_mp4(filename_prefix, images.shape[2], images.shape[1])
            waveform, rate = (audio["waveform"][0], audio["sample_rate"]) if audio is not None else (None, None)
            av.write_mp4(path, images, fps, waveform, rate, crf=crf, progress=progress_bar(images.shape[0]))
        return io.NodeOutput(InputImpl.VideoFromFile(path), ui={"images": [saved], "animated": (True,)})
