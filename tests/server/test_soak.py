"""The soak (scripts/soak.py), shortened: a minute of mixed traffic with dropped streams,
client timeouts, bad requests and 429 bursts leaves a live server, no 5xx, no KV block
held, flat memory and no leaked file descriptors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_a_minute_of_mixed_traffic(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"),
                          "--duration", "60", "--workers", "6", "--sample-every", "2",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.exists(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server_errors"] == []
    assert report["verdicts"] == {"no_5xx": True, "kv_back_to_zero": True,
                                  "memory_flat": True, "fds_flat": True, "alive_after": True}
    statuses = report["answers_by_status"]
    assert statuses.get("200", 0) > 50 and statuses.get("400", 0) > 5
    assert report["outcomes"].get("drop", 0) > 0 and report["outcomes"].get("timeout_cut", 0) > 0
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
