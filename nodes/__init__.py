"""The pack's ComfyUI nodes: one module per stage, each a thin layer over narrate_model."""
import logging
import shutil
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folders
from . import dialogue, evaluate, narrate, speech, train, video, weights
from .mux import AVMux

NODES: list[type[io.ComfyNode]] = [*speech.NODES, *video.NODES, *narrate.NODES, AVMux, *weights.NODES,
                                 *evaluate.NODES, *train.NODES, *dialogue.NODES]


EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "inputs"


def copy_example_inputs() -> None:
    """The templates (workflows/*.json) name the example inputs the pack ships in workflows/inputs/ (README
    "Workflows" says where they come from); copy them into ComfyUI's input folder, never over a file already there."""
    import folder_paths

    target = Path(folder_paths.get_input_directory())
    for example in sorted(EXAMPLE_INPUTS.iterdir()):
        if not (target / example.name).exists():
            try:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(example, target / example.name)
            except OSError as error:  # a read-only input folder: the templates then ask for the user's own files
                logging.warning("Narrating For You: could not copy the example %s into %s: %s", example.name, target,
                                error)


class NarrateExtension(ComfyExtension):
    def __init__(self):
        register_model_folders()
        copy_example_inputs()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
