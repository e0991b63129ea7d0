"""perf.gateway_overhead runs end to end on the tiny checkpoint: builds and serves it, starts sd-gateway,
times both routes and writes its report (no timing is judged here: perf/README.md has the numbers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.triton_server import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_gateway_overhead_reports_both_routes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    command = [sys.executable, "-m", "perf.gateway_overhead", "--checkpoint", str(tiny_checkpoint)]
    options = ["--repeats", "2", "--steps", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    run = subprocess.run([*command, *options], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    for route in ("(a) client → Triton (gRPC)", "(b) HTTP → sd-gateway → Triton (gRPC)"):
        [row] = [line for line in text.splitlines() if line.startswith(f"| {route} |")]
        assert len(row.split("|")[-2].split(",")) == 2  # both timed calls listed
    assert re.search(
        r"gateway overhead, median \(b\) ÷ median \(a\) − 1: \*\*[+-]\d+\.\d\d%\*\* \(target ≤ 2%", text
    )
    assert "same image both ways: yes" in text
