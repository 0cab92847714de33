"""Which power meter an engine uses: NVML or RAPL when they can be read, else the model,
with its wattage taken from the flag or from peregrine/estimate/devices.json."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from peregrine.energy.meters import (BoardPowerModelMeter, CpuModelMeter, PowerMeter,
                                     find_nvml, find_rapl)

logger = logging.getLogger("peregrine")

POWER_SOURCES = ("auto", "nvml", "rapl", "model", "off")


# The estimate's device table (read as data: the engine sits below the estimate package).
DEVICES_JSON = os.path.join(os.path.dirname(os.path.dirname(__file__)), "estimate",
                            "devices.json")


def _devices_table() -> dict[str, Any]:
    with open(DEVICES_JSON, encoding="utf-8") as f:
        return json.load(f)


def cpu_watts_per_core(data: dict[str, Any] | None = None) -> tuple[float, str]:
    """The CPU model's watts per busy core and where the number comes from."""
    entry = (data or _devices_table())["cpu_power"]
    return float(entry["watts_per_core"]), entry["source"]


def gpu_board_power(device_name: str, data: dict[str, Any] | None = None
                    ) -> tuple[float, str] | None:
    """The datasheet board power of the table's GPU whose name `device_name` contains
    (the longest such name: "A100 80GB" before "A100"), or None."""
    name = device_name.lower()
    matches = [g for g in (data or _devices_table())["gpus"]
               if all(part in name for part in g["name"].lower().split())]
    if not matches:
        return None
    best = max(matches, key=lambda g: len(g["name"]))
    return float(best["board_power_w"]), f"{best['name']}: {best['board_power_source']}"


def model_meter(device: torch.device, watts: float | None) -> PowerMeter:
    """The stated power model of `device`: CPU time x watts per core, or GPU wall time x
    board power; `watts` overrides the table."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if watts is not None:
            return BoardPowerModelMeter(watts, "--power-watts")
        found = gpu_board_power(name)
        if found is None:
            raise ValueError(f"no board power for {name!r} in devices.json: give "
                             "--power-watts (the GPU's power limit in watts)")
        return BoardPowerModelMeter(*found)
    if watts is not None:
        return CpuModelMeter(watts, "--power-watts")
    return CpuModelMeter(*cpu_watts_per_core())


def make_meter(source: str, device: torch.device, watts: float | None = None
               ) -> PowerMeter | None:
    """The meter `source` asks for (None for `off`). `auto`: NVML on a GPU, RAPL on a CPU,
    the model when those cannot be read (None, with a warning, on a GPU the table does not
    know); asking for `nvml`, `rapl` or `model` and not getting it is an error."""
    if source not in POWER_SOURCES:
        raise ValueError(f"power_source must be one of {'|'.join(POWER_SOURCES)}, got "
                         f"{source!r}")
    if source == "off":
        return None
    if source in ("auto", "nvml") and device.type == "cuda":
        meter = find_nvml(device.index if device.index is not None
                          else torch.cuda.current_device())
        if meter is not None:
            return meter
    if source == "nvml":
        raise ValueError("power_source=nvml: no NVML energy counter (needs a CUDA device, "
                         "nvidia-ml-py and a Volta or newer GPU)")
    if source in ("auto", "rapl") and device.type == "cpu":
        meter = find_rapl()
        if meter is not None:
            return meter
    if source == "rapl":
        raise ValueError("power_source=rapl: no readable RAPL counter under "
                         "/sys/class/powercap or amd_energy hwmon (reading them usually "
                         "needs root)")
    try:
        return model_meter(device, watts)
    except ValueError as e:
        if source == "model":
            raise
        # auto must not stop an engine from starting on a GPU the table does not know
        logger.warning("energy accounting is off: %s", e)
        return None
