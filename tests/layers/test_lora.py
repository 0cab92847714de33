"""LoRALinear: each row gets its own adapter's delta on top of whatever linear runs (float
or any quantized format); rows of the base model get the linear alone."""

from __future__ import annotations

import pytest
import torch

from peregrine.layers.linear import QUANT_LINEAR_TYPES, Linear
from peregrine.layers.lora import LoRABatch, LoRAFactors, LoRALinear, LoRAState


def test_a_batch_groups_rows_by_slot_and_keeps_the_base_rows_out():
    batch = LoRABatch(torch.tensor([2, -1, 0, 2, -1, 0, 1]))
    assert batch.segments == [(0, 2, 0), (2, 3, 1), (3, 5, 2)]
    assert batch.rows.tolist() == [2, 5, 6, 0, 3]
    assert not batch.all_rows_in_order
    assert LoRABatch(torch.tensor([1, 1, 1])).all_rows_in_order
    assert LoRABatch(torch.tensor([-1, -1])).segments == []


def random_factors(g: torch.Generator, rank: int, slices: list[int], k: int,
                   skip: int | None = None) -> list[LoRAFactors | None]:
    return [None if j == skip else LoRAFactors(torch.randn(rank, k, generator=g),
                                               torch.randn(size, rank, generator=g), 0.25)
            for j, size in enumerate(slices)]


@pytest.mark.parametrize("method", ["float", *sorted(QUANT_LINEAR_TYPES)])
def test_each_row_gets_its_adapters_delta_on_any_base_linear(method):
    g = torch.Generator().manual_seed(0)
    slices, k = [64, 32, 32], 128
    w = torch.randn(sum(slices), k, generator=g) * 0.05
    if method == "float":
        base = Linear(k, sum(slices))
        base.weight.data = w
    else:
        base = QUANT_LINEAR_TYPES[method].from_float(w)
    state = LoRAState()
    layer = LoRALinear(base, slices, max_loras=3, max_rank=8, state=state,
                       dtype=torch.float32, device=torch.device("cpu"))
    adapters = [random_factors(g, 8, slices, k), random_factors(g, 4, slices, k, skip=1),
                random_factors(g, 2, slices, k, skip=0)]
    for slot, factors in enumerate(adapters):
        layer.set_slot(slot, factors)
    slots = [1, -1, 0, 2, 2, -1, 0, 1]
    x = torch.randn(len(slots), k, generator=g)
    with torch.inference_mode():
        with state.active(LoRABatch(torch.tensor(slots))):
            got = layer(x)
        plain = base(x)
        assert torch.equal(layer(x), plain)  # outside a batch: the base linear alone
    for t, s in enumerate(slots):
        want = plain[t].clone()
        if s >= 0:
            pieces = [torch.zeros(size) if f is None else (x[t] @ f.a.t() @ f.b.t()) * f.scaling
                      for f, size in zip(adapters[s], slices)]
            want += torch.cat(pieces)
        torch.testing.assert_close(got[t], want, atol=1e-4, rtol=1e-4)


def test_clearing_a_slot_removes_its_delta():
    g = torch.Generator().manual_seed(1)
    base = Linear(16, 8)
    base.weight.data = torch.randn(8, 16, generator=g)
    state = LoRAState()
    layer = LoRALinear(base, [8], 1, 4, state, torch.float32, torch.device("cpu"))
    layer.set_slot(0, random_factors(g, 4, [8], 16))
    x = torch.randn(3, 16, generator=g)
    layer.clear_slot(0)
    with torch.inference_mode(), state.active(LoRABatch(torch.zeros(3, dtype=torch.long))):
        assert torch.equal(layer(x), base(x))
