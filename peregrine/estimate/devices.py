"""The devices `peregrine estimate` sizes a model for: datasheet GPUs (devices.json) and
this machine's CPU, each with the efficiency its speed predictions use and where it came
from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

DATA_FILE = os.path.join(os.path.dirname(__file__), "devices.json")


@dataclass(frozen=True)
class Device:
    """One device kind: memory, roof, efficiencies and runtime overhead."""

    name: str
    kind: str  # cuda | cpu
    memory_bytes: float
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s in the compute dtype
    decode_efficiency: float  # fraction of `bandwidth` a decode step reaches
    prefill_efficiency: float  # fraction of `flops` a prefill reaches
    runtime_overhead_bytes: float  # while serving
    source: str  # where the memory and roof come from
    efficiency_source: str  # where the efficiencies come from (measured or assumed)
    max_count: int = 8  # most devices of this kind one tensor-parallel group may use
    load_overhead_bytes: float | None = None  # while loading; None: runtime_overhead_bytes

    @property
    def load_overhead(self) -> float:
        return (self.runtime_overhead_bytes if self.load_overhead_bytes is None
                else self.load_overhead_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def load_data(path: str = DATA_FILE) -> dict[str, Any]:
    """The parsed devices.json."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def gpu_devices(data: dict[str, Any] | None = None) -> list[Device]:
    """Every GPU of the table, with the shared (assumed) GPU efficiencies."""
    data = data or load_data()
    eff = data["gpu_efficiency"]
    return [Device(name=g["name"], kind="cuda", memory_bytes=g["memory_mib"] * 2**20,
                   bandwidth=float(g["bandwidth"]), flops=float(g["flops_bf16"]),
                   decode_efficiency=eff["decode"], prefill_efficiency=eff["prefill"],
                   runtime_overhead_bytes=data["gpu_runtime_overhead_bytes"],
                   source=g["source"], efficiency_source=eff["source"])
            for g in data["gpus"]]


@dataclass(frozen=True)
class CpuCalibration:
    """One `peregrine bench workloads` run on a CPU: measured prefill and decode tok/s of a
    model in one quantization, the roof it ran under, and how it was made."""

    cpu: str
    isa: list[str]
    threads: int
    model: str
    quantization: str
    prefill_workload: str
    prefill_tok_s: float
    decode_workload: str
    decode_tok_s: float
    peak_flops: float
    peak_bandwidth: float
    peak_source: str
    runtime_overhead_bytes: float  # RSS of a process that ran the engine on a tiny model
    load_overhead_bytes: float  # RSS of a process that loaded a tiny model
    command: str
    date: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CpuCalibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def cpu_calibrations(data: dict[str, Any] | None = None) -> list[CpuCalibration]:
    """The stored CPU measurements."""
    data = data or load_data()
    return [CpuCalibration.from_dict(c) for c in data.get("cpu_calibrations", [])]


def pick_calibration(calibrations: list[CpuCalibration], cpu: str, threads: int,
                     method: str) -> CpuCalibration | None:
    """The measurement that best matches this CPU, thread count and weight format: the same
    CPU first, then the same format, then the same threads."""
    if not calibrations:
        return None
    return max(calibrations, key=lambda c: (c.cpu == cpu, c.quantization == method,
                                            c.threads == threads))
