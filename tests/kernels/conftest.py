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
SKIP_REASON = None if HAVE_TRITON else "triton is not installed"


def imported_compiled() -> bool:
    """Whether triton is already imported, in compiled (not interpreter) mode."""
    if "triton" not in sys.modules:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return not isinstance(tl.zeros, InterpretedFunction)


if HAVE_TRITON and not ON_GPU and imported_compiled():
    # Something imported triton (compiled mode) before this folder was collected: its own
    # library functions cannot be interpreted now. Run this folder alone to test kernels.
    SKIP_REASON = ("triton was imported before tests/kernels/conftest.py could switch on its "
                   "interpreter; run `pytest tests/kernels` on its own")
elif HAVE_TRITON and not ON_GPU:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import peregrine.kernels.triton_attention  # noqa: F401  (decorates every kernel)
        import peregrine.kernels.triton.fused_moe  # noqa: F401
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:  # only the Triton kernels' tests: the C++ ones need no triton
        path = str(item.fspath)
        if path.startswith(here) and os.path.basename(path).startswith("test_triton"):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """The interpreter switch, on for the duration of each kernel test (CPU only)."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernels run: the GPU when there is one, else the CPU (interpreted)."""
    return torch.device("cuda" if ON_GPU else "cpu")
