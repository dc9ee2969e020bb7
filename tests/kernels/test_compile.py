"""The Triton kernels compile for a Hopper GPU (no GPU needed), vectorised and with IEEE arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require
from tests.kernels.conftest import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    require(HAS_TRITON, "triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_for_gpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 6
    for report in reports:
        # Every global load and store of the data is a 16-byte vector (alignment proven from the hints).
        assert report["ld_v4"] > 0 and report["st_v4"] > 0, report
        if "div_rn" in report and report["kernel"] == "_gather_quant_kernel":
            assert report["div_rn"] > 0 and report["div_approx"] == 0, report
            assert (report["cvt_e4m3_rn"] > 0) == (report["codec"] == "fp8"), report
