"""Narrating For You: the model library behind the node pack.

Pure PyTorch (+ diffusers, transformers, safetensors, mediapipe). Nothing here imports ComfyUI, so every stage is
usable and testable on its own; `nodes/` wraps these functions for ComfyUI graphs.
"""
