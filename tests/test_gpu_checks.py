"""``bench/gpu_checks.sh --dry``: the GPU script, run with tiny presets on the CPU, finishes and hands its reports
to ``$OUT`` (the device tool's folder). It had never run to the end: the DIME evaluation wrote its report to
``reports/benchmarks/$TMP/dime_eval_gpu.md.md`` (after the measuring, so the run was lost), and DIME's bf16 step
went NaN at its second step. No GPU is needed; a GPU machine runs the same script without ``--dry``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_checks_dry_run_finishes_and_copies_its_reports(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "train_step_gpu.md").write_text("| an earlier run's table |\n")  # a rerun appended to it
    os.utime(reports / "train_step_gpu.md", (0, 86400))
    (reports / "train_step_gpu.commands.txt").write_text("an earlier run's commands\n")
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "REPORT_DIR": str(reports)}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_checks.sh"), "--dry"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (reports / "train_step_gpu.19700102T000000Z.md").read_text() == "| an earlier run's table |\n"  # kept
    assert "earlier run" not in (reports / "train_step_gpu.md").read_text()  # the new run's own table
    assert (reports / "train_step_gpu.19700102T000000Z.commands.txt").read_text() == "an earlier run's commands\n"
    rows = [line for line in (tmp_path / "train_step_gpu.md").read_text().splitlines() if "bf16" in line]
    assert len(rows) == 7  # AMC, DIME i2t and t2i, BLIP stage I and II, CaLa, HREM
    assert "DIME full-matrix evaluation speed" in (tmp_path / "dime_eval_gpu.md").read_text()
    commands = [line for line in (tmp_path / "train_step_gpu.commands.txt").read_text().splitlines()
                if "train_step.py" in line]
    # on the CPU one warm-up and one timed step per model (3 + 2 took two minutes): the run, not its speed, is checked
    assert len(commands) == 7 and all("--steps 1 --warmup 1" in line for line in commands), commands
