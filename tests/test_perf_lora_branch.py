"""perf.lora_branch runs end to end on the tiny checkpoint: exports both UNet graphs, probes their memory,
times every variant and writes its report (no timing is judged here: perf/README.md has the numbers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.triton_server import PROJECT_ROOT


def test_lora_branch_benchmark_reports_every_variant(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    command = [sys.executable, "-m", "perf.lora_branch", "--checkpoint", str(tiny_checkpoint), "--size", "64"]
    options = ["--rounds", "2", "--ranks", "4,8", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    run = subprocess.run([*command, *options], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    for key in "abcdef":
        [row] = [line for line in text.splitlines() if line.startswith(f"| ({key}) ")]
        assert len(row.split("|")[-2].split(",")) == 2  # both timed calls listed
    assert "| (c) branch graph, R = 4 on all " in text and "| (d) branch graph, R = 8 on all " in text
    assert re.search(r"no-LoRA cost, median \(b\) ÷ median \(a\) − 1: \*\*[+-]\d+\.\d\d%\*\* \(", text)
    # At R = 0 the branch graph computes the plain graph's output.
    [diff] = re.findall(r"\(b\)'s output vs \(a\)'s: max abs difference (\S+)", text)
    assert float(diff) <= 1e-5
    memory_rows = [line for line in text.splitlines() if line.startswith(("| plain", "| branch"))]
    assert len(memory_rows) == 5
    assert re.search(r"^Verdict: ", text, re.MULTILINE)
