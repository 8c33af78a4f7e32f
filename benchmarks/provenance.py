"""What a benchmark ran with, recorded in every results JSON so that a figure can be reproduced or explained.

Run as scripts (`python benchmarks/NAME.py`), the benchmarks import this module from their own folder.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import time

PACKAGES = ("torch", "torchaudio", "transformers", "diffusers", "accelerate", "safetensors", "numpy", "av")


def package_versions(names=PACKAGES) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict:
    """Versions, machine and load: the load average matters because this CPU may be shared with other jobs."""
    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "packages": package_versions(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if cuda else None,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
