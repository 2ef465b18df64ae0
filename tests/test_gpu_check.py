"""benchmarks/gpu_check.sh --dry-run: the GPU machine's one command, run on CPU at tiny sizes so it cannot rot."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["build", "gpu_tests", "static", "psg_variants", "lambda_max", "model_lambda_max", "sparse_backward",
         "frozen_step"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry-run", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.md").read_text()
    assert r.returncode == 0, summary + r.stdout[-2000:] + r.stderr[-2000:]
    for step in STEPS:
        assert f"| {step} | ok |" in summary, summary
    for csv in ("psg_variants", "lambda_max", "model_lambda_max", "sparse_backward", "frozen_step"):
        lines = (tmp_path / f"{csv}.csv").read_text().splitlines()
        assert len(lines) >= 2 and lines[0].startswith("date,"), csv
    assert (tmp_path / "static.json").stat().st_size > 0
