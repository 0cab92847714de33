"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else on the CPU through
Triton's interpreter.

Triton chooses interpreter or compiler when a function is decorated, i.e. when triton and
our kernel modules are first imported, and reads the switch again in a few places at run
time: TRITON_INTERPRET=1 is set for that import and during each test of this folder only,
so the rest of the session sees the environment it started with."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None

if HAVE_TRITON and not ON_GPU:
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before tests/kernels/conftest.py could switch "
                           "on its interpreter (TRITON_INTERPRET must precede the import)")
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import peregrine.kernels.triton_attention  # noqa: F401  (decorates every kernel)
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous


def pytest_collection_modifyitems(config, items):
    if not HAVE_TRITON:
        skip = pytest.mark.skip(reason="triton is not installed")
        for item in items:
            if "tests/kernels" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """The interpreter switch, on for the duration of each kernel test (CPU only)."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernels run: the GPU when there is one, else the CPU (interpreted)."""
    return torch.device("cuda" if ON_GPU else "cpu")
