"""Weights moved into huge pages: same values, same sharing, same outputs."""

import pytest
import torch

from peregrine.models import huge_pages
from peregrine.models.huge_pages import HUGE_PAGE, huge_pages_available, move_to_huge_pages


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(300, 64)
        self.proj = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("table", torch.arange(40000, dtype=torch.int32))
        self.register_buffer("small", torch.ones(3))
        self.lookup = torch.nn.Embedding(1000, 64)  # not tied: looked up, never streamed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.embed(ids))) + self.table[:300].float()


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")
def test_moved_tensors_keep_values_sharing_and_outputs():
    torch.manual_seed(0)
    net = Tied()
    ids = torch.arange(10)
    before = {n: t.clone() for n, t in net.state_dict().items()}
    out = net(ids)
    moved = move_to_huge_pages(net, min_bytes=1024)
    # the tied weight counts once; the 12-byte buffer and the untied embedding stay
    assert moved == 300 * 64 * 4 + 64 * 64 * 4 + 40000 * 4
    assert net.head.weight is net.embed.weight
    assert isinstance(net.proj.weight, torch.nn.Parameter)
    for name, t in net.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(net(ids), out)
    ptrs = sorted(t.data_ptr() for t in (net.embed.weight, net.proj.weight, net.table))
    assert all(p % 64 == 0 for p in ptrs)
    assert ptrs[-1] - ptrs[0] < HUGE_PAGE  # one area, packed
    assert net.small.data_ptr() != ptrs[0]
    assert not ptrs[0] <= net.lookup.weight.data_ptr() <= ptrs[-1]


def test_nothing_moves_without_huge_pages(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)
    net = Tied()
    ptr = net.proj.weight.data_ptr()
    assert move_to_huge_pages(net, min_bytes=1024) == 0
    assert net.proj.weight.data_ptr() == ptr


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")
def test_loaded_cpu_models_are_in_huge_pages():
    from peregrine.models.loader import load_model
    net = load_model(None, quantization="gguf").model
    layer = net.layers[0].mlp.gate_up_proj
    area = [t.data_ptr() for t in (layer.qweight, layer.scale, net.lm_head.qweight)]
    assert max(area) - min(area) < 200 << 20
    assert all(p % 64 == 0 for p in area)
