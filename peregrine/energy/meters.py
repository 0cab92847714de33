"""Power meters: cumulative joules from NVML, RAPL counters, or a stated power model.

Every meter counts joules from the moment it was made; the engine reads one before and
after each step and splits the difference among the step's requests (accounting.py).
`source` says what kind of figure it is (`nvml` and `rapl` are measured by the hardware,
`model` is computed from a stated wattage) and `description` says where the number comes
from, so every report can print both next to its figures."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("peregrine")

POWERCAP_ROOT = "/sys/class/powercap"
HWMON_ROOT = "/sys/class/hwmon"


class PowerMeter:
    """Cumulative energy in joules since the meter was made."""

    source: str = "model"  # nvml | rapl | model
    description: str = ""

    def joules(self) -> float:
        """Joules consumed since the meter was made."""
        raise NotImplementedError


class FakePowerMeter(PowerMeter):
    """A meter that reports whatever the test sets (`add` or `set`)."""

    def __init__(self, source: str = "model", description: str = "fake meter (tests)") -> None:
        self.source = source
        self.description = description
        self.total = 0.0

    def add(self, joules: float) -> None:
        """Consume `joules` more."""
        self.total += joules

    def joules(self) -> float:
        return self.total


class CpuModelMeter(PowerMeter):
    """The CPU power model: this process's CPU seconds (all threads) x watts per busy core.

    CPU time is what /proc/self/stat's utime + stime count; time.process_time reads the same
    clock with nanosecond resolution instead of 10 ms ticks, which matters for steps of a
    few milliseconds. Idle and uncore power are not counted: the figure is the share of
    package power the engine's busy cores stand for."""

    source = "model"

    def __init__(self, watts_per_core: float, why: str,
                 cpu_seconds: Callable[[], float] = time.process_time) -> None:
        if watts_per_core <= 0:
            raise ValueError(f"watts per core must be > 0, got {watts_per_core}")
        self.watts_per_core = watts_per_core
        self._cpu_seconds = cpu_seconds
        self._start = cpu_seconds()
        self.description = (f"model: process CPU time x {watts_per_core:g} W per busy core "
                            f"({why})")

    def joules(self) -> float:
        return (self._cpu_seconds() - self._start) * self.watts_per_core


class BoardPowerModelMeter(PowerMeter):
    """The GPU power model without NVML: the board's power limit for every wall second."""

    source = "model"

    def __init__(self, watts: float, why: str,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if watts <= 0:
            raise ValueError(f"board power must be > 0 W, got {watts}")
        self.watts = watts
        self._clock = clock
        self._start = clock()
        self.description = f"model: wall time x {watts:g} W board power ({why})"

    def joules(self) -> float:
        return (self._clock() - self._start) * self.watts


@dataclass
class EnergyCounter:
    """One sysfs energy counter in microjoules; `max_uj` is where it wraps (None: never)."""

    path: str
    max_uj: int | None = None
    last: int | None = None
    total_uj: int = 0

    def read(self) -> int:
        """Microjoules since the first read, across wraparounds."""
        with open(self.path, encoding="ascii") as f:
            now = int(f.read().strip())
        if self.last is not None:
            delta = now - self.last
            if delta < 0 and self.max_uj:  # the counter wrapped past max_energy_range_uj
                delta += self.max_uj + 1
            self.total_uj += max(delta, 0)
        self.last = now
        return self.total_uj


def rapl_counters(root: str = POWERCAP_ROOT) -> list[EnergyCounter]:
    """The readable package-level RAPL zones (`intel-rapl:N`, also AMD's under the same
    driver); subzones (`intel-rapl:N:M`, cores and DRAM inside a package) are skipped so
    nothing is counted twice."""
    out = []
    for zone in sorted(glob.glob(os.path.join(root, "*rapl:*"))):
        if os.path.basename(zone).count(":") != 1:
            continue
        energy = os.path.join(zone, "energy_uj")
        if not os.access(energy, os.R_OK):
            continue
        max_uj = None
        try:
            with open(os.path.join(zone, "max_energy_range_uj"), encoding="ascii") as f:
                max_uj = int(f.read().strip())
        except (OSError, ValueError):
            pass
        out.append(EnergyCounter(energy, max_uj))
    return out


def amd_energy_counters(root: str = HWMON_ROOT) -> list[EnergyCounter]:
    """The socket counters of AMD's `amd_energy` hwmon driver (energyN_input, microjoules,
    labelled EsocketK; the per-core Ecore counters are inside them). The driver keeps
    64-bit software accumulators, so they do not wrap."""
    out = []
    for hw in sorted(glob.glob(os.path.join(root, "hwmon*"))):
        try:
            with open(os.path.join(hw, "name"), encoding="ascii") as f:
                if f.read().strip() != "amd_energy":
                    continue
        except OSError:
            continue
        for label in sorted(glob.glob(os.path.join(hw, "energy*_label"))):
            with open(label, encoding="ascii") as f:
                if not f.read().strip().startswith("Esocket"):
                    continue
            energy = label.removesuffix("_label") + "_input"
            if os.access(energy, os.R_OK):
                out.append(EnergyCounter(energy))
    return out


class RaplMeter(PowerMeter):
    """Package energy from RAPL counters (powercap or amd_energy), summed over sockets.

    It is the whole package's energy, other processes' included, so it is an upper bound
    on what the engine used while they run."""

    source = "rapl"

    def __init__(self, counters: list[EnergyCounter]) -> None:
        if not counters:
            raise ValueError("no readable RAPL counter")
        self.counters = counters
        for c in counters:
            c.read()
        self.description = ("measured: RAPL package energy counters ("
                            + ", ".join(c.path for c in counters) + ")")

    def joules(self) -> float:
        return sum(c.read() for c in self.counters) / 1e6


def find_rapl(powercap: str = POWERCAP_ROOT, hwmon: str = HWMON_ROOT) -> RaplMeter | None:
    """A RaplMeter over this machine's readable counters, or None when there are none."""
    counters = rapl_counters(powercap) or amd_energy_counters(hwmon)
    if not counters:
        return None
    try:
        return RaplMeter(counters)
    except (OSError, ValueError):  # listed but not readable (root-only since Linux 5.10)
        return None


class NvmlMeter(PowerMeter):
    """The GPU's own energy counter (nvmlDeviceGetTotalEnergyConsumption, millijoules since
    the driver loaded; Volta and newer). It counts the whole board, other processes'
    kernels included."""

    source = "nvml"

    def __init__(self, nvml: Any, handle: Any, name: str) -> None:
        self._nvml = nvml
        self._handle = handle
        self._start = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        self.description = f"measured: NVML total energy counter of {name}"

    def joules(self) -> float:
        return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start) / 1e3


def find_nvml(device_index: int) -> NvmlMeter | None:
    """An NvmlMeter on CUDA device `device_index`, or None (no pynvml, no counter)."""
    try:
        import pynvml  # optional: nvidia-ml-py
        import torch
        pynvml.nvmlInit()
        bus_id = getattr(torch.cuda.get_device_properties(device_index), "pci_bus_id", None)
        # NVML numbers devices without CUDA_VISIBLE_DEVICES; the PCI bus id is the same in both
        handle = (pynvml.nvmlDeviceGetHandleByPciBusId(bus_id) if bus_id
                  else pynvml.nvmlDeviceGetHandleByIndex(device_index))
        name = torch.cuda.get_device_name(device_index)
        return NvmlMeter(pynvml, handle, name)
    except Exception as e:  # noqa: BLE001 - any failure means: use the model instead
        logger.info("NVML energy counter not available (%s): using the power model", e)
        return None
