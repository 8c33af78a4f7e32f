"""The Narrate box asks ComfyUI's model management for all its models in ONE load_models_gpu call (so room is made
once for all of them), the trained entangler among them, read from disk once and then reused.

Runs the pack's node module in a fresh process against the real ComfyUI (in-process here, ComfyUI's top-level
modules would collide with the pack's `nodes` package), with load_models_gpu wrapped to record its calls."""
import json
import subprocess
import sys

from conftest import REPO, recorded_path

SCRIPT = r'''
import importlib.util, json, sys
import torch
comfyui, repo, weights, broken = sys.argv[1:5]
sys.path.insert(0, comfyui)
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import comfy.model_management as mm
spec = importlib.util.spec_from_file_location("nfy_pack", repo + "/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules["nfy_pack"] = pack
spec.loader.exec_module(pack)
from nfy_pack.narrate_model import entangle
from nfy_pack.nodes import common, narrate

calls, reads, load = [], [], mm.load_models_gpu
mm.load_models_gpu = lambda models, *a, **k: (calls.append(len(models)), load(models, *a, **k))[1]
read = narrate.load_entangler
narrate.load_entangler = lambda path: (reads.append(path), read(path))[1]
if broken == "1":  # the broken variant: one model-management call per model
    def separately(patchers):
        return [common.load_to_device(p) for p in patchers]
    narrate.load_together = separately

class Handle:
    def __init__(self, module):
        self.patcher = common.patcher(module)

entangle.save_entangler(entangle.Entangler().eval(), weights)
handle = narrate.EntanglerHandle(weights, "ETE")
runs = []
for _ in range(2):
    *_, entangler = narrate.narration_models(Handle(torch.nn.Linear(2, 2)), Handle(torch.nn.Linear(3, 3)),
                                             Handle(torch.nn.Linear(4, 4)), handle)
    runs.append(entangler)
print(json.dumps({"calls": calls, "reads": len(reads), "same_entangler": runs[0] is runs[1],
                  "entangler_device": str(next(runs[0].parameters()).device), "compute": str(mm.get_torch_device())}))
'''


def narrate_loads(tmp_path, broken: bool) -> dict:
    comfyui = recorded_path("COMFYUI_DIR")
    assert comfyui, "no ComfyUI found: run tests/install.sh (or set COMFYUI_DIR)"
    done = subprocess.run([sys.executable, "-c", SCRIPT, comfyui, str(REPO), str(tmp_path / "e.safetensors"),
                           "1" if broken else "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(report: dict) -> None:
    assert report["calls"] == [4, 4], report  # xtts, hallo, wav2vec2 and the entangler together, once per run
    assert report["reads"] == 1 and report["same_entangler"], report  # read from disk once, then reused
    assert report["entangler_device"] == report["compute"], report


def test_narrate_loads_its_models_in_one_call_and_a_per_model_variant_fails(tmp_path):
    check(narrate_loads(tmp_path, broken=False))
    separate = narrate_loads(tmp_path, broken=True)
    assert separate["calls"] == [1] * 8
    try:
        check(separate)
    except AssertionError:
        pass
    else:
        raise AssertionError("the check accepted one model-management call per model")
