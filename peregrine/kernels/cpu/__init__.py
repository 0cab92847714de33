"""Our C++ CPU kernels, compiled with the machine's compiler on first use and cached.

`quant_ops()` (weight-only dequantizing linears, quant_linear.cpp) and `q8_ops()` (int8-dot
linears and the fused decode step, q8_decode.cpp) return the compiled module, or None where
it cannot exist (no AVX2/FMA, no compiler, a failed build); callers then take the torch
reference path. The build lands in
$PEREGRINE_CACHE (default ~/.cache/peregrine)/torch_extensions/<name>-<hash of the source,
flags and torch version> (compiled from a copy of the source kept there) and is reused by
every later process: checkouts with the same source share one build, and checkouts with
different sources never rebuild each other's."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from types import ModuleType

import torch

logger = logging.getLogger("peregrine")

_lock = threading.Lock()


def cache_dir() -> str:
    """Where compiled extensions are kept."""
    root = os.environ.get("PEREGRINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                          "peregrine"))
    return os.path.join(root, "torch_extensions")


def cpu_supports_kernels() -> bool:
    """Whether this CPU runs AVX2 + FMA code (what the kernels are written for)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_modules: dict[str, ModuleType | None] = {}


def _clear_stale_lock(build: str, max_age_s: float = 600.0) -> None:
    """Remove torch's build lock when it is older than any build takes: a build killed midway
    leaves it behind, and every later process would wait on it forever."""
    lock = os.path.join(build, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > max_age_s:
            os.remove(lock)
            logger.warning("removed a stale kernel build lock: %s", lock)
    except OSError:  # no lock (the usual case), or another process removed it first
        pass


def build_dir(name: str, source_path: str) -> str:
    """The build directory of one extension: keyed by what the build depends on, because
    torch's own check (the build file, which names the source's path) rebuilds whenever a
    process from another checkout loads it."""
    digest = hashlib.sha256()
    with open(source_path, "rb") as f:
        digest.update(f.read())
    digest.update(" ".join(_FLAGS + [torch.__version__]).encode())
    return os.path.join(cache_dir(), f"{name}-{digest.hexdigest()[:16]}")


def _stable_copy(path: str, build: str) -> str:
    """The source as compiled: a copy inside its build directory, so that the build file
    torch writes (which names the source's path) is the same from every checkout and ninja
    never rebuilds because another checkout loaded it."""
    copy = os.path.join(build, "src", os.path.basename(path))
    if not os.path.exists(copy):
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        tmp = f"{copy}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, copy)  # atomic: a concurrent process sees all of it or none
    return copy


def _build(name: str, source: str) -> ModuleType | None:
    """Compile (or load the cached build of) one extension; None when it cannot exist."""
    if name in _modules:
        return _modules[name]
    with _lock:
        if name in _modules:
            return _modules[name]
        module = None
        if os.environ.get("PEREGRINE_NO_CPP_KERNELS") != "1" and cpu_supports_kernels():
            try:
                from torch.utils.cpp_extension import load
                path = os.path.join(os.path.dirname(__file__), source)
                build = build_dir(name, path)
                os.makedirs(build, exist_ok=True)
                _clear_stale_lock(build)
                module = load(name=name, sources=[_stable_copy(path, build)],
                              extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                              build_directory=build, verbose=False)
            except Exception as e:  # no compiler, no ninja, a build error: fall back, say why
                logger.warning("peregrine C++ kernels (%s) unavailable, using the torch path: "
                               "%s", source, e)
        _modules[name] = module
    return module


def quant_ops() -> ModuleType | None:
    """The weight-only quantized-linear kernels, or None when unavailable (logged once).

    PEREGRINE_NO_CPP_KERNELS=1 disables them (to compare against the torch path)."""
    return _build("peregrine_quant_linear", "quant_linear.cpp")


def q8_ops() -> ModuleType | None:
    """The int8-dot linears and the fused decode step, or None when unavailable."""
    return _build("peregrine_q8_decode", "q8_decode.cpp")
