"""LoRA fixtures: a tiny random Llama saved as a Hugging Face directory, and random PEFT
adapters of it written by peft itself (the reference every LoRA test compares against)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.conftest import write_hf_checkpoint

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Adapter:
    """A PEFT adapter on disk and the PEFT model it came from."""

    path: str
    model: torch.nn.Module  # the base with the adapter applied (peft), in eval mode


def make_adapter(base: torch.nn.Module, path: str, seed: int, r: int = 8,
                 targets: list[str] | None = None, scale: float = 0.1,
                 **config: Any) -> Adapter:
    """A random LoRA adapter of `base` saved by peft at `path` (A and B both random: peft
    starts B at zero, which would make the delta vanish)."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=r, lora_alpha=config.pop("lora_alpha", 2 * r),
                           target_modules=targets or ALL_TARGETS, **config)
    model = peft.get_peft_model(copy.deepcopy(base), lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * scale)
    model.save_pretrained(path)
    return Adapter(path, model.eval())


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """A tiny random Llama (transformers) saved as a HF directory: (path, model)."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("lora-base"), "llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base, tmp_path_factory) -> dict[str, Adapter]:
    """Adapters of the tiny Llama: rank 8 on every linear, rank 4 on attention only, and
    rank 16 with rsLoRA and an alpha_pattern."""
    _, base = tiny_base
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all8": make_adapter(base, str(root / "all8"), seed=1, r=8),
        "attn4": make_adapter(base, str(root / "attn4"), seed=2, r=4,
                              targets=["q_proj", "v_proj", "o_proj"]),
        "rs16": make_adapter(base, str(root / "rs16"), seed=3, r=16, use_rslora=True,
                             alpha_pattern={"down_proj": 4}),
    }


def edit_config(src: str, dst: str, **changes: Any) -> str:
    """A copy of adapter `src` at `dst` with adapter_config.json changed."""
    import shutil
    shutil.copytree(src, dst)
    file = os.path.join(dst, "adapter_config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)
    return dst
