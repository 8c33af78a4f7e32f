"""A 5,000-character narration completes in sentence chunks through the streaming path, with peak memory within
10 % of a one-sentence narration's (the benchmark's own measurement, small checkpoints, fresh processes)."""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from narration_memory import measure  # noqa: E402


def test_long_narration_memory_stays_flat(tmp_path):
    report = measure(tmp_path)
    one, long = report["cases"]["one_sentence"], report["cases"]["long_5000_chars"]
    assert long["characters"] == 5000 and long["chunks"] > 20 and one["chunks"] == 1
    assert long["frames"] == long["frames_in_mp4"] and one["frames"] == one["frames_in_mp4"]
    assert long["frames"] > 10 * 16  # many clips, each carrying motion frames into the next
    assert report["peak_ratio_long_over_one"] <= 1.10, report
