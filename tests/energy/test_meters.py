"""Power meters: RAPL sysfs parsing with wraparound, amd_energy hwmon, the CPU model from
CPU-time deltas, the GPU board-power table, and meter selection on this machine."""

from __future__ import annotations

import os

import pytest
import torch

from peregrine.energy.meters import (BoardPowerModelMeter, CpuModelMeter, amd_energy_counters,
                                     find_rapl, rapl_counters)
from peregrine.energy.select import cpu_watts_per_core, gpu_board_power, make_meter


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def fake_powercap(root, zones: dict[str, tuple[int, int]]) -> None:
    """zones: name -> (energy_uj, max_energy_range_uj)."""
    for name, (energy, max_uj) in zones.items():
        _write(os.path.join(root, name, "energy_uj"), f"{energy}\n")
        _write(os.path.join(root, name, "max_energy_range_uj"), f"{max_uj}\n")


def test_rapl_reads_package_zones_only_and_handles_wraparound(tmp_path):
    root = str(tmp_path / "powercap")
    fake_powercap(root, {"intel-rapl:0": (999_000_000, 1_000_000_000),
                         "intel-rapl:0:0": (5, 1_000_000_000),  # core subzone: inside pkg 0
                         "intel-rapl:1": (100, 1_000_000_000)})
    meter = find_rapl(root, str(tmp_path / "nohwmon"))
    assert meter is not None and meter.source == "rapl"
    assert [os.path.basename(os.path.dirname(c.path)) for c in meter.counters] == [
        "intel-rapl:0", "intel-rapl:1"]
    assert meter.joules() == 0.0
    # package 0 wraps: 999,000,000 -> max (1e9) -> 0 -> 2,000,000 is 3,000,001 uJ
    _write(os.path.join(root, "intel-rapl:0", "energy_uj"), "2000000\n")
    _write(os.path.join(root, "intel-rapl:1", "energy_uj"), "500100\n")
    assert meter.joules() == pytest.approx(3.000001 + 0.5)
    _write(os.path.join(root, "intel-rapl:0", "energy_uj"), "3000000\n")
    assert meter.joules() == pytest.approx(4.000001 + 0.5)


def test_unreadable_or_missing_rapl_is_none(tmp_path):
    assert find_rapl(str(tmp_path / "absent"), str(tmp_path / "absent")) is None
    # listed but failing to read (root-only files, here a directory in the file's place)
    root = str(tmp_path / "powercap")
    os.makedirs(os.path.join(root, "intel-rapl:0", "energy_uj"))
    assert find_rapl(root, str(tmp_path / "absent")) is None
    # not readable by this user: not even listed (as root everything is readable)
    other = str(tmp_path / "other")
    fake_powercap(other, {"intel-rapl:0": (1, 10)})
    os.chmod(os.path.join(other, "intel-rapl:0", "energy_uj"), 0)
    readable = os.access(os.path.join(other, "intel-rapl:0", "energy_uj"), os.R_OK)
    assert len(rapl_counters(other)) == (1 if readable else 0)


def test_amd_energy_hwmon_sums_socket_counters(tmp_path):
    hw = tmp_path / "hwmon" / "hwmon3"
    _write(str(hw / "name"), "amd_energy\n")
    _write(str(hw / "energy1_label"), "Ecore000\n")
    _write(str(hw / "energy1_input"), "7\n")
    _write(str(hw / "energy17_label"), "Esocket0\n")
    _write(str(hw / "energy17_input"), "1000000\n")
    _write(str(tmp_path / "hwmon" / "hwmon0" / "name"), "k10temp\n")
    counters = amd_energy_counters(str(tmp_path / "hwmon"))
    assert [os.path.basename(c.path) for c in counters] == ["energy17_input"]
    meter = find_rapl(str(tmp_path / "nopowercap"), str(tmp_path / "hwmon"))
    _write(str(hw / "energy17_input"), "3500000\n")
    assert meter.joules() == pytest.approx(2.5)


def test_cpu_model_is_cpu_seconds_times_watts_per_core():
    clock = iter([10.0, 10.0, 12.5, 14.0])
    meter = CpuModelMeter(3.75, "test", cpu_seconds=lambda: next(clock))
    assert meter.source == "model" and "3.75 W per busy core" in meter.description
    assert meter.joules() == 0.0
    assert meter.joules() == pytest.approx(2.5 * 3.75)  # 2 cores busy for 1.25 s
    assert meter.joules() == pytest.approx(4.0 * 3.75)
    with pytest.raises(ValueError):
        CpuModelMeter(0, "zero")


def test_cpu_model_counts_this_process_busy_time():
    meter = CpuModelMeter(2.0, "test")
    x = 0
    for i in range(2_000_000):  # burn some CPU time
        x += i
    assert meter.joules() > 0


def test_board_power_model_and_table():
    clock = iter([0.0, 2.0])
    meter = BoardPowerModelMeter(700.0, "H100", clock=lambda: next(clock))
    assert meter.joules() == pytest.approx(1400.0)
    watts, why = gpu_board_power("NVIDIA H100 80GB HBM3")
    assert watts == 700 and why.startswith("H100:")
    assert gpu_board_power("NVIDIA A100-SXM4-80GB")[1].startswith("A100")
    assert gpu_board_power("NVIDIA L4")[0] == 72
    assert gpu_board_power("Some Unknown GPU") is None
    watts, why = cpu_watts_per_core()
    assert watts == 3.75 and "EPYC 9654" in why and "360 W" in why


def test_make_meter_on_the_cpu():
    cpu = torch.device("cpu")
    assert make_meter("off", cpu) is None
    meter = make_meter("model", cpu, 5.0)
    assert isinstance(meter, CpuModelMeter) and meter.watts_per_core == 5.0
    auto = make_meter("auto", cpu)
    if find_rapl() is None:  # this VM: no /sys/class/powercap, so the model
        assert isinstance(auto, CpuModelMeter) and auto.watts_per_core == 3.75
        with pytest.raises(ValueError, match="RAPL"):
            make_meter("rapl", cpu)
    with pytest.raises(ValueError, match="NVML"):
        make_meter("nvml", cpu)
    with pytest.raises(ValueError, match="power_source"):
        make_meter("solar", cpu)


def test_a_gpu_without_nvml_or_table_entry(monkeypatch):
    """auto leaves accounting off (the engine still starts); model asks for --power-watts."""
    import peregrine.energy.select as select
    monkeypatch.setattr(select, "find_nvml", lambda index: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    gpu = torch.device("cuda", 0)
    assert make_meter("auto", gpu) is None
    with pytest.raises(ValueError, match="--power-watts"):
        make_meter("model", gpu)
    meter = make_meter("auto", gpu, 300.0)
    assert isinstance(meter, BoardPowerModelMeter) and meter.watts == 300.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert make_meter("auto", gpu).watts == 700.0


def test_nvml_meter_converts_millijoules_since_start():
    from peregrine.energy.meters import NvmlMeter

    class FakeNvml:
        readings = iter([5_000_000, 5_001_500, 5_250_000])  # mJ since the driver loaded

        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            assert handle == "gpu0"
            return next(self.readings)

    meter = NvmlMeter(FakeNvml(), "gpu0", "NVIDIA H200")
    assert meter.source == "nvml" and "NVIDIA H200" in meter.description
    assert meter.joules() == pytest.approx(1.5)
    assert meter.joules() == pytest.approx(250.0)
