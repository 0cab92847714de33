"""The machine and software a benchmark ran on, saved with every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

from peregrine.bench.roofline import cpu_name


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_flags() -> list[str]:
    """The SIMD features that matter for CPU inference speed."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def memory_gib() -> float | None:
    """Total RAM in GiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def git_commit() -> str | None:
    """The peregrine checkout's commit (with -dirty when it has local changes)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def llama_cpp_build() -> str | None:
    """llama.cpp's build info as llama-cpp-python reports it (its system info line)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info()
    return info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info)


def environment(threads: int | None = None, gpu: bool = False,
                argv: list[str] | None = None) -> dict[str, Any]:
    """Date, machine, load, versions and the command line (`peregrine ARGV`) of this run."""
    import torch
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
        "memory_gib": memory_gib(), "threads": threads,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "llama_cpp_python": package_version("llama_cpp_python"),
        "peregrine": package_version("peregrine"), "peregrine_commit": git_commit(),
        "command": shlex.join(["peregrine", *(sys.argv[1:] if argv is None else argv)]),
    }
    if gpu and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env
