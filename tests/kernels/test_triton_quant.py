"""The Triton dequant-GEMM equals the torch reference (run by Triton's CPU interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from peregrine.layers.linear import Int4Linear, Int8Linear, NF4Linear
    from peregrine.kernels.triton_quant import quant_matmul
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=g) * 0.05  # K = 96: a ragged last group of 64
    x = torch.randn(3, 96, generator=g)
    layers = [Int8Linear.from_float(w), Int8Linear.from_float(w, None, 32),
              Int4Linear.from_float(w, None, 64), Int4Linear.from_float(w, None, 32, True),
              NF4Linear.from_float(w, None, 64)]
    for layer in layers:
        got = quant_matmul(x, layer)
        torch.testing.assert_close(got, layer.forward_reference(x), rtol=1e-4, atol=1e-5)
    print("ok", len(layers))
""")


def test_triton_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok 5" in res.stdout
