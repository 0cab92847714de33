"""Energy and cost per request: power meters (NVML, RAPL, a stated model) and the
attribution of each step's energy and time to its requests (docs/cost.md)."""

from peregrine.energy.accounting import JOULES_PER_KWH, EnergyAccountant, StepEnergy, split
from peregrine.energy.meters import (CpuModelMeter, FakePowerMeter, NvmlMeter, PowerMeter,
                                     RaplMeter)
from peregrine.energy.select import POWER_SOURCES, make_meter

__all__ = ["JOULES_PER_KWH", "POWER_SOURCES", "CpuModelMeter", "EnergyAccountant",
           "FakePowerMeter", "NvmlMeter", "PowerMeter", "RaplMeter", "StepEnergy",
           "make_meter", "split"]
