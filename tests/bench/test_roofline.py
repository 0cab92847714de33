"""The roofline math: FLOPs and bytes of a chunk of work, device peaks, MFU and MBU."""

from __future__ import annotations

import json

import pytest
import torch

from peregrine.bench import roofline
from peregrine.bench.roofline import (DevicePeak, ModelCost, attention_pairs, device_peak,
                                      gpu_peak, mbu, mfu, state_dict_bytes)
from peregrine.models.config import ModelConfig

SMOLLM2 = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576,
                      intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                      head_dim=64, tie_word_embeddings=True)


def brute_pairs(start: int, n: int, window: int | None) -> int:
    return sum(min(p + 1, window or p + 1) for p in range(start, start + n))


@pytest.mark.parametrize("start,n", [(0, 1), (0, 7), (5, 1), (5, 9), (30, 40)])
@pytest.mark.parametrize("window", [None, 1, 8, 32, 100])
def test_attention_pairs_count_what_the_causal_window_keeps(start, n, window):
    assert attention_pairs(start, n, window) == brute_pairs(start, n, window)


def test_a_prefill_chunk_costs_the_same_as_its_tokens_one_by_one():
    cost = ModelCost.from_config(SMOLLM2, 4.0, 4.0)
    whole = cost.chunk_flops(10, 20, logits=False)
    single = sum(cost.chunk_flops(10 + i, 1, logits=False) for i in range(20))
    assert whole == pytest.approx(single)


def test_smollm2_cost_model_by_hand():
    cost = ModelCost.from_config(SMOLLM2, bytes_per_param=4.0, kv_bytes_per_value=4.0)
    h, i, layers = 576, 1536, 30
    per_layer = h * (576 + 2 * 192) + 576 * h + 3 * h * i + 2 * h
    assert cost.layer_params == layers * per_layer + h
    assert cost.head_params == 49152 * 576
    assert SMOLLM2.num_params() == cost.layer_params + cost.head_params  # tied: head = embedding
    assert cost.weight_bytes == 4.0 * SMOLLM2.num_params()
    assert cost.kv_bytes_per_token == 2 * layers * 192 * 4
    # One decode token at position 99 (sees 100 keys): matmuls + head + attention.
    flops = 2 * cost.layer_params + 2 * cost.head_params + 4 * 9 * 64 * layers * 100
    assert cost.chunk_flops(99, 1) == flops
    # It reads the 100-token context and writes itself.
    assert cost.chunk_kv_bytes(99, 1) == 101 * cost.kv_bytes_per_token


def test_untied_lm_head_is_a_matmul_and_the_embedding_is_not():
    cfg = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, tie_word_embeddings=False)
    cost = ModelCost.from_config(cfg, 2.0, 2.0)
    assert cost.head_params == 1000 * 64
    assert cost.layer_params + cost.head_params == cfg.num_params(include_embeddings=False)
    assert cost.weight_bytes == 2.0 * cfg.num_params(include_embeddings=False)


def test_state_dict_bytes_counts_tied_weights_once():
    emb = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert state_dict_bytes(model) == 100 * 8 * 4


def test_utilization_is_achieved_over_peak():
    peak = DevicePeak("x", flops=100e12, bandwidth=2e12, source="test")
    assert mfu(50e12, 1.0, peak) == pytest.approx(0.5)
    assert mbu(1e12, 2.0, peak) == pytest.approx(0.25)
    assert mfu(1.0, 0.0, peak) == 0.0


def test_gpu_peaks_from_the_datasheet_table():
    h100 = gpu_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert (h100.flops, h100.bandwidth) == (989e12, 3.35e12)
    h200 = gpu_peak("NVIDIA H200", torch.bfloat16)
    assert (h200.flops, h200.bandwidth) == (989e12, 4.8e12)
    assert gpu_peak("NVIDIA H100 PCIe", torch.float16).bandwidth == 2.0e12
    with pytest.raises(ValueError, match="no datasheet peak for GPU"):
        gpu_peak("Some Other GPU", torch.bfloat16)


def test_cpu_peak_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    small = DevicePeak("cpu", 1e9, 1e9, "measured")
    calls = []
    monkeypatch.setattr(roofline, "measure_cpu_peak",
                        lambda threads: calls.append(threads) or small)
    assert roofline.cpu_peak(2) == small
    assert roofline.cpu_peak(2) == small
    assert calls == [2]
    cached = json.loads((tmp_path / "peregrine" / "cpu_peak.json").read_text())
    assert any("threads=2" in k for k in cached)
    roofline.cpu_peak(2, remeasure=True)
    assert calls == [2, 2]


def test_a_real_cpu_measurement_is_positive():
    peak = roofline.measure_cpu_peak(1, matmul_size=128, copy_mib=4, repeats=2)
    assert peak.flops > 0 and peak.bandwidth > 0 and "measured" in peak.source


def test_command_line_peaks_override_the_device(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(roofline, "measure_cpu_peak",
                        lambda threads: DevicePeak("cpu", 1e9, 1e9, "measured"))
    peak = device_peak(torch.device("cpu"), torch.float32, 2, flops=5e9, bandwidth=7e9)
    assert (peak.flops, peak.bandwidth) == (5e9, 7e9)
    assert peak.source == "given on the command line"
