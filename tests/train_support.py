"""What the training tests share: torch on one thread (their tensors are tiny or their measures are CPU time),
reading a run's loss log, and launching a script as two CPU processes with accelerate."""
import csv
import os
import subprocess
import sys
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


REPO = Path(__file__).resolve().parents[1]


def launch_two_processes(script, args: list[str], net_log: Path, port: int, timeout: int):
    """`accelerate launch` of `script args` as 2 processes joined with gloo over loopback, under the tests' network
    guard (any other connection attempt is logged to `net_log`). -> the finished subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "netguard"), str(REPO),
                                                                      os.environ.get("PYTHONPATH")])),
           "NFY_NETGUARD_LOG": str(net_log), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
               "127.0.0.1", "--main_process_port", str(port), str(script), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
