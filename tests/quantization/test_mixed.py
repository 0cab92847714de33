"""Mixed precision per layer: sensitivity is measured, the plan meets its budget and spends
it where the loss is, and the checkpoint loads back with every layer in its format."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peregrine.layers.linear import Int4Linear, Int8Linear
from peregrine.models.loader import load_model
from peregrine.quantization.mixed import (CANDIDATES, REFERENCE, LayerStats, format_name,
                                          measure, parse_format, plan, plan_bits, uniform_bits)
from peregrine.quantization.quantize import QuantizeOptions, quantize_to_dir
from tests.conftest import write_hf_checkpoint
from tests.quantization.test_checkpoint import logits

NAMES = [format_name(f) for f in CANDIDATES]


def layer(name: str, sensitivity: float, weights: int = 1000) -> LayerStats:
    """A linear whose formats cost bits in order and lose error in order."""
    bits = {"int4-g256": 4.1, "int4-g128": 4.3, "int4-g64": 4.5, "int4-g32": 5.0, "int8": 8.1}
    err = {"int4-g256": 1.3, "int4-g128": 1.0, "int4-g64": 0.8, "int4-g32": 0.6, "int8": 0.01}
    return LayerStats(name, weights, sensitivity,
                      {k: int(b * weights / 8) for k, b in bits.items()}, err)


def test_format_names_round_trip():
    for fmt in CANDIDATES:
        assert parse_format(format_name(fmt)) == fmt
    assert format_name(REFERENCE) == "int4-g128"


def test_the_plan_spends_the_budget_on_the_sensitive_layers():
    # the two big calm layers pay (in coarser groups) for the small touchy one's int8
    stats = [layer("calm", 0.001, 20000), layer("touchy", 0.5), layer("mild", 0.01, 20000)]
    choice = plan(stats, uniform_bits(stats, REFERENCE))
    assert plan_bits(stats, choice) <= uniform_bits(stats, REFERENCE)
    assert choice["touchy"] == "int8"
    assert NAMES.index(choice["calm"]) <= NAMES.index(choice["mild"])
    predicted = sum(s.loss(choice[s.name]) for s in stats)
    assert predicted < sum(s.loss("int4-g128") for s in stats)  # better than uniform


def test_more_bits_never_predict_more_loss_and_too_few_are_refused():
    stats = [layer(f"l{i}", s) for i, s in enumerate([0.3, 0.02, 0.1, 0.0, 0.05])]
    losses = []
    for bits in (4.1, 4.3, 5.0, 6.0, 8.1):
        choice = plan(stats, bits)
        assert plan_bits(stats, choice) <= bits + 1e-9
        losses.append(sum(s.loss(choice[s.name]) for s in stats))
    assert losses == sorted(losses, reverse=True)
    with pytest.raises(ValueError, match="below the smallest"):
        plan(stats, 3.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = write_hf_checkpoint(tmp_path_factory.mktemp("hf"), "llama", hidden_size=64,
                                  intermediate_size=128, vocab_size=49152, num_hidden_layers=2)
    return path


def test_sensitivity_is_measured_and_finds_a_damaged_layer(tiny):
    net = load_model(tiny, dtype=torch.float32).model
    # an outlier column makes one linear's groups coarse: quantizing it hurts most
    with torch.no_grad():
        net.layers[1].mlp.down_proj.weight[:, 3] *= 60
    ids = list(range(100, 356))
    stats = measure(net, ids, context=128)
    assert [s.name for s in stats][:2] == ["layers.0.self_attn.qkv_proj",
                                           "layers.0.self_attn.o_proj"]
    assert all(isinstance(m, torch.nn.Module) for m in net.modules())  # left float
    worst = max(stats, key=lambda s: s.sensitivity)
    assert worst.name == "layers.1.mlp.down_proj" and worst.sensitivity > 0
    for s in stats:
        assert s.rel_error["int4-g128"] == pytest.approx(1.0)
        assert s.rel_error["int8"] < s.rel_error["int4-g32"] < s.rel_error["int4-g256"]
        assert s.bytes["int4-g256"] <= s.bytes["int4-g128"] < s.bytes["int8"]  # 64-wide rows: one group


def test_a_mixed_checkpoint_loads_back_in_its_formats(tiny, tmp_path):
    out = str(tmp_path / "mixed")
    summary = quantize_to_dir(tiny, out, QuantizeOptions(method="rtn", mixed=True,
                                                         sensitivity_tokens=256,
                                                         calib_seq_len=128))
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    chosen = qc["mixed"]["plan"]
    assert qc["format"] == "mixed" and summary["bits"] <= qc["mixed"]["target_bits"] + 1e-9
    assert qc["mixed"]["target_bits"] == pytest.approx(summary["bits"], rel=0.05)
    loaded = load_model(out).model
    mods = dict(loaded.named_modules())
    for name, fmt in chosen.items():
        method, group = parse_format(fmt)
        assert isinstance(mods[name], Int4Linear if method == "int4" else Int8Linear), name
        if method == "int4":  # a group as wide as the row is a scale per row (None)
            m = mods[name]
            assert m.group_size == (group if group < m.in_features else None), name
    float_net = load_model(tiny, dtype=torch.float32).model
    ids = list(range(3, 40))
    cos = torch.nn.functional.cosine_similarity(
        logits(loaded, ids).flatten(), logits(float_net, ids).flatten(), dim=0)
    assert cos > 0.9


def test_budget_left_after_the_sensitive_layers_is_still_spent():
    stats = [layer("touchy", 0.5), layer("flat", 0.0, 20000), layer("noisy", -0.01, 20000)]
    choice = plan(stats, uniform_bits(stats, ("int4", 32)))
    # nothing measured against the two big ones, yet the budget upgrades them too
    assert choice["flat"] != "int4-g256" and choice["noisy"] != "int4-g256"
