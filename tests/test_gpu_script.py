"""benchmarks/gpu.sh runs end to end (the CPU dry run of the GPU benchmark): every section reports numbers, the
compiled UNet gives the eager clip, and a section that fails is reported with its error while the others still are."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("hallo", "xtts", "vae", "narration", "hallo_compiled")
FIGURE = {"hallo": "seconds_per_frame", "xtts": "seconds_per_code", "vae": "seconds_per_frame",
          "narration": "wall_s", "hallo_compiled": "seconds_per_frame"}


def gpu_sh(out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny", "--out", str(out),
                    *extra], check=True, env=env, timeout=600)
    return json.loads(out.read_text())


def check_sections(report: dict, sections=SECTIONS) -> None:
    for section in sections:
        result = report["sections"][f"{section}_fp32"]
        assert "error" not in result, f"{section}: {result.get('error')}"
        assert result[FIGURE[section]] > 0 and result["peak_rss_gb"] > 0, result


def test_gpu_script_dry_run_reports_every_section(tmp_path):
    report = gpu_sh(tmp_path / "gpu.json")
    check_sections(report)
    assert report["hallo_published"]["seconds_per_frame"] == 1.63 and report["goal"]["seconds_per_frame"] == 0.15
    assert report["environment"]["packages"]["torch"]
    compiled = report["sections"]["hallo_compiled_fp32"]
    assert compiled["graphs_compiled_so_far"] >= 1  # torch.compile really traced the UNet
    assert compiled["max_abs_diff_vs_eager"] <= 1e-5  # and gives the eager clip (fp32, same weights and seed)
    assert report["sections"]["xtts_fp32"]["real_time_factor"] > 0


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path):
    report = gpu_sh(tmp_path / "gpu.json", "--sections", "vae,xtts", "--fail", "vae_fp32")
    assert "failed on request" in report["sections"]["vae_fp32"]["error"]
    check_sections(report, ["xtts"])
    try:
        check_sections(report, ["vae"])  # the guard above catches a section that reports an error
    except AssertionError:
        pass
    else:
        raise AssertionError("check_sections accepted a failed section")
