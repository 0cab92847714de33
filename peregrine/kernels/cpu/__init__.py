"""Our C++ CPU kernels, compiled with the machine's compiler on first use and cached.

`quant_ops()` returns the compiled module, or None where it cannot exist (no AVX2/FMA, no
compiler, a failed build); callers then take the torch reference path. The build lands in
$PEREGRINE_CACHE (default ~/.cache/peregrine)/torch_extensions and is reused by every later
process; torch rebuilds it only when the source changes."""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

import torch

logger = logging.getLogger("peregrine")

_SOURCE = os.path.join(os.path.dirname(__file__), "quant_linear.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def cache_dir() -> str:
    """Where compiled extensions are kept."""
    root = os.environ.get("PEREGRINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                          "peregrine"))
    return os.path.join(root, "torch_extensions")


def cpu_supports_kernels() -> bool:
    """Whether this CPU runs AVX2 + FMA code (what the kernels are written for)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def quant_ops() -> ModuleType | None:
    """The compiled quantized-linear kernels, or None when unavailable (logged once).

    PEREGRINE_NO_CPP_KERNELS=1 disables them (to compare against the torch path)."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("PEREGRINE_NO_CPP_KERNELS") == "1" or not cpu_supports_kernels():
            _tried = True
            return None
        try:
            from torch.utils.cpp_extension import load
            build = cache_dir()
            os.makedirs(build, exist_ok=True)
            _module = load(name="peregrine_quant_linear", sources=[_SOURCE],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
        except Exception as e:  # no compiler, no ninja, a build error: fall back, say why
            logger.warning("peregrine C++ kernels unavailable, using the torch path: %s", e)
            _module = None
        _tried = True
    return _module
