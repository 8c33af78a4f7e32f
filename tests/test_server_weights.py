"""Weights on the real server: nothing is fetched unless the Download Weights node runs, an offline server says
what is missing and how to get it, and loaders show the licence of what they load."""
from comfy_server import messages_of


def _error(comfy, prompt) -> str:
    entry = comfy.wait(comfy.queue(prompt), expect="error")
    return messages_of(entry, "execution_error")[0]["exception_message"]


def test_download_node_offline_names_every_missing_file_its_folder_and_licence(comfy, comfy_server):
    message = _error(comfy, {"1": {"class_type": "NFY_DownloadWeights",
                                   "inputs": {"weights": "xtts-v2", "include_optional": False}}})
    assert "Offline" in message
    for name in ("config.json", "model.pth", "vocab.json"):
        assert name in message
    assert str(comfy_server.base / "models" / "narrate" / "xtts" / "XTTS-v2") in message
    assert "python -m narrate_model download xtts-v2" in message
    assert "Coqui Public Model License" in message and "non-commercial" in message


def test_loading_graphs_and_failing_loaders_touch_no_network(comfy, comfy_server):
    comfy.object_info()
    message = _error(comfy, {
        "1": {"class_type": "NFY_LoadXTTS", "inputs": {"checkpoint": "XTTS-v2"}},
        "2": {"class_type": "NFY_DownloadWeights", "inputs": {"weights": "hallo", "include_optional": False}},
    })
    assert "Load XTTS-v2" in message or "Download Weights" in message
    assert comfy_server.network_attempts() == []
    assert not any((comfy_server.base / "models").rglob("*.part")), "a download started"
