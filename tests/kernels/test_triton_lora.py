"""The segmented LoRA kernels (peregrine/kernels/triton/lora.py) against a row-by-row torch
reference: rows of several adapters and of the base model, adapters of different ranks and
targeted slices, in one batch. Through LoRALinear.add_triton, which the GPU path calls."""

from __future__ import annotations

import pytest
import torch

from peregrine.layers.lora import LoRABatch, LoRAFactors, LoRALinear, LoRAState
from peregrine.layers.linear import Linear


def lora_linear(slices: list[int], in_features: int, max_loras: int, max_rank: int,
                device: torch.device, seed: int = 0) -> LoRALinear:
    """A random float linear with random adapters in every slot; slot s has rank
    max_rank - s and leaves slice 1 untargeted in odd slots."""
    g = torch.Generator().manual_seed(seed)
    base = Linear(in_features, sum(slices))
    base.weight.data = torch.randn(sum(slices), in_features, generator=g) * 0.1
    layer = LoRALinear(base.to(device), slices, max_loras, max_rank, LoRAState(),
                       torch.float32, device)
    for s in range(max_loras):
        r = max_rank - s
        factors = [LoRAFactors(torch.randn(r, in_features, generator=g),
                               torch.randn(size, r, generator=g), 0.5 + s)
                   if not (s % 2 and j == 1) else None for j, size in enumerate(slices)]
        layer.set_slot(s, factors)
    return layer


def expected(layer: LoRALinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Row by row: the base output plus its slot's x A^T B^T * scaling per slice."""
    y = layer.base(x).clone()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        r = layer.ranks[s]
        h = x[t] @ layer.lora_a[s, :len(layer.slices) * r].t()
        for j, (off, size) in enumerate(zip(layer.offsets, layer.slices)):
            if layer.targets[s][j]:
                y[t, off:off + size] += h[j * r:(j + 1) * r] @ layer.lora_bts[j][s, :r]
    return y


@pytest.mark.parametrize("slices", [[48], [32, 16, 16]])
def test_kernels_equal_the_torch_reference(device, slices):
    layer = lora_linear(slices, in_features=40, max_loras=4, max_rank=8, device=device)
    slots = [2, -1, 0, 2, 3, -1, 1, 0, 0, 2, 3, 1, 1, -1, 2, 0, 3, 3, 0]
    x = torch.randn(len(slots), 40, generator=torch.Generator().manual_seed(1)).to(device)
    got = layer.base(x)
    layer.add_triton(x, got, LoRABatch(torch.tensor(slots), device))
    want = expected(layer.to("cpu"), x.cpu(), slots)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_one_adapter_for_every_row_and_none_at_all(device):
    layer = lora_linear([24, 24], in_features=32, max_loras=2, max_rank=16, device=device)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2)).to(device)
    got = layer.base(x)
    layer.add_triton(x, got, LoRABatch(torch.tensor([1] * 5), device))
    torch.testing.assert_close(got.cpu(), expected(layer, x, [1] * 5).cpu(), atol=1e-4,
                               rtol=1e-4)
