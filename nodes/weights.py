"""Download Weights: fetches a known checkpoint into ComfyUI's models folder, only when the user queues it."""
import folder_paths
from comfy_api.latest import io

from ..narrate_model.fetch import DownloadError, fetch
from ..narrate_model.weights import BUNDLES, licence_notice, local_path, resolve
from .common import CATEGORY, progress_bar


class DownloadWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NFY_DownloadWeights", display_name="Download Weights", category=f"{CATEGORY}/loaders",
            description="Downloads one of the pack's known checkpoints into ComfyUI/models at its pinned revision, "
                        "resuming cut transfers and checking each file's SHA-256 before it is used. Files already "
                        "present and verified are kept. Honours HF_ENDPOINT, HF_HUB_OFFLINE and proxy settings. "
                        "Nothing is ever downloaded unless this node runs.",
            inputs=[
                io.Combo.Input("weights", options=[b for b, entries in BUNDLES.items()
                                                   if any(e.published for e in entries)],
                               tooltip="Which checkpoint to fetch: xtts-v2 (speech), hallo (video), sd-vae-ft-mse, "
                                       "wav2vec2-base-960h, face-analysis, face-landmarker."),
                io.Boolean.Input("include_optional", default=False,
                                 tooltip="Also fetch the bundle's optional files (e.g. XTTS's built-in speakers)."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="Where each file is and its licence.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, weights, include_optional=False) -> io.NodeOutput:
        entries = resolve(weights, include_optional=include_optional)
        models_dir = folder_paths.models_dir
        try:
            fetch(entries, models_dir, progress=progress_bar(1))
        except DownloadError as e:
            raise ValueError(f"Download Weights: input 'weights' ({weights}): {e}") from e
        lines = [f"{local_path(e, models_dir)}" for e in entries]
        lines += list(dict.fromkeys(licence_notice(e) for e in entries))
        report = "\n".join(lines)
        return io.NodeOutput(report, ui={"text": [report]})


NODES = [DownloadWeights]
