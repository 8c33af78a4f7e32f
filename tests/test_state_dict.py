"""Refusing a pickled checkpoint says why in our own words, then gives torch's whole detail, and never runs code."""
import os
import pickle

import pytest
import torch

from narrate_model.errors import CheckpointError
from narrate_model.state_dict import read_checkpoint


class RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refusal_of(path) -> tuple[str, str]:
    """(our message, torch's own text) for a file torch.load(weights_only=True) refuses."""
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    return str(info.value), str(info.value.__cause__)


def check_refusal(message: str, detail: str, name: str) -> None:
    assert message.startswith(f"{name} was not loaded: it is not a plain weights file"), message
    assert "truncated or corrupt" in message and "Download the file again" in message
    assert message.endswith(detail), "torch's detail must follow in full, not cut"


def test_a_pickle_that_would_run_code_is_refused_in_our_words_with_torchs_full_detail(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, f)
    message, detail = refusal_of(evil)
    assert not marker.exists(), "loading ran the pickled command"
    assert len(detail) > 200  # torch's explanation is long: the old 200-character cut lost its reason
    check_refusal(message, detail, "evil.pth")
    # The control: the old wording (torch's text cut at 200 characters) fails the same check.
    old = f"evil.pth could not be read as a weights-only checkpoint (UnpicklingError: {detail[:200]})"
    with pytest.raises(AssertionError):
        check_refusal(old, detail, "evil.pth")


def test_a_truncated_checkpoint_is_refused_the_same_way(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    message, detail = refusal_of(cut)
    check_refusal(message, detail, "cut.pth")
