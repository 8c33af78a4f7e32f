"""Narrating For You: ComfyUI nodes that make a portrait speak any text in the person's own voice.

ComfyUI imports this folder as a package and calls `comfy_entrypoint` (node API V3). Importing it loads no weights
and touches no network: models load when a loader node runs.
"""
WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes import NarrateExtension  # imported here so the library stays importable without ComfyUI

    return NarrateExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
