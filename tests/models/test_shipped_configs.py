"""The shipped configs of the newer architectures parse into what transformers builds from
the same config.json: parameter count (on the meta device, no memory) and layer kinds."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peregrine.models.config import ModelConfig
from peregrine.models.registry import CONFIG_DIR

NEW = ["qwen3-0.6b", "qwen3-8b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini-4k", "mixtral-8x7b",
       "qwen3-30b-a3b"]


@pytest.mark.parametrize("name", NEW)
def test_shipped_config_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    with open(os.path.join(CONFIG_DIR, name, "config.json")) as f:
        raw = json.load(f)
    ours = ModelConfig.from_hf(raw, name)
    hf_cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    windows = [ours.layer_window(i) for i in range(ours.num_layers)]
    if ours.is_gemma:
        assert ours.sliding_window is None
        kinds = hf_cfg.layer_types
        assert windows == [hf_cfg.sliding_window if k == "sliding_attention" else None
                           for k in kinds]
    else:
        assert windows == [getattr(hf_cfg, "sliding_window", None)
                           if getattr(hf_cfg, "use_sliding_window", True) else None] \
            * ours.num_layers


@pytest.mark.parametrize("name", NEW)
def test_quantized_checkpoint_config_round_trips(name):
    """A quantized checkpoint's config.json (quantization/checkpoint.py) reads back as the
    same ModelConfig: layer kinds, soft-caps, local RoPE base, longrope factors."""
    from peregrine.quantization.checkpoint import hf_config
    with open(os.path.join(CONFIG_DIR, name, "config.json")) as f:
        cfg = ModelConfig.from_hf(json.load(f), name)
    assert ModelConfig.from_hf(json.loads(json.dumps(hf_config(cfg))), name) == cfg


def test_longrope_config_round_trips():
    from peregrine.quantization.checkpoint import hf_config
    raw = dict(architectures=["Phi3ForCausalLM"], vocab_size=64, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=1024, original_max_position_embeddings=64,
               rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [3.0] * 4})
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_scaling["rope_type"] == "longrope"
    assert ModelConfig.from_hf(hf_config(cfg)) == cfg
