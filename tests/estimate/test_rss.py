"""Peak RSS of a real engine process against the estimate (slow: fresh processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "estimate_check.py")


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 1, 3, 4])  # SmolLM2 none, int8, gguf; qwen2.5-0.5b none
def test_peak_rss_within_5_percent(tmp_path, case):
    subprocess.run([sys.executable, SCRIPT, "--cases", str(case), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    with open(tmp_path / "estimate_check.json") as f:
        (row,) = json.load(f)["memory"]
    assert row["weights_bytes"]["error"] == 0 and row["kv_cache_bytes"]["error"] == 0
    assert abs(row["peak_rss"]["error"]) <= 0.05, row
