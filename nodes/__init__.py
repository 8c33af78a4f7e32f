"""The pack's ComfyUI nodes: one module per stage, each a thin layer over narrate_model."""
from comfy_api.latest import ComfyExtension, io

from .common import register_model_folders
from . import narrate, speech, train, video, weights
from .mux import AVMux

NODES: list[type[io.ComfyNode]] = [*speech.NODES, *video.NODES, *narrate.NODES, AVMux, *weights.NODES, *train.NODES]


class NarrateExtension(ComfyExtension):
    def __init__(self):
        register_model_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
