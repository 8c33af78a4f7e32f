"""What the training tests share: torch on one thread (their tensors are tiny or their measures are CPU time), and
reading a run's loss log."""
import csv
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: a second OpenMP thread only waits (15x slower on a busy machine), and a CPU-time measure of one
    thread is the work itself. Autouse in every module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def log_rows(run_dir, split="train") -> list[dict]:
    with open(Path(run_dir) / "loss_log.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def max_loss_diff(rows_a, rows_b, names=("total", "video", "audio")) -> float:
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    return max(abs(float(a[k]) - float(b[k])) for a, b in zip(rows_a, rows_b) for k in names)
