"""bench/gpu.sh --tiny: the GPU check's own script, on tiny models on the CPU, so that it cannot rot between the
sessions that are lent a GPU (it is then run once, as it is, on the device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_script_runs_its_tiny_mode_and_prints_one_table(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "bench/gpu.sh"), "--tiny", "--out", str(tmp_path / "gpu")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "bench/gpu.py on cpu" in p.stdout
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    labels = [label for label, _ in summary["rows"]]
    assert "tiny-a step (2 steps, s)" in labels and "tiny-a training MFU" in labels
    assert summary["planned"]["step_roofline_s"] > 0 and summary["measured"]["steps"] == 2
    assert summary["decode"]["eager_ms"] > 0 and summary["tsopsd_step"] is not None
    assert summary["kernels"]["decode step"] and summary["kernels"]["training micro-batch"]
