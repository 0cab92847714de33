"""The models a server serves: repeated --model flags, the models file, the memory estimate."""

from __future__ import annotations

import pytest

from peregrine.cli import build_parser
from peregrine.config import EngineConfig
from peregrine.server.model_entries import (entries_from_file, entries_from_flags,
                                            estimate_memory)

BASE = EngineConfig(kv_cache_memory=0.25)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return str(path)


def test_serve_takes_model_repeatedly_and_the_router_flags():
    ns = build_parser().parse_args(["serve", "--model", "smollm2-135m", "--model",
                                    "qwen2.5-0.5b", "--max-loaded-models", "1",
                                    "--memory-budget", "1000", "--keep-alive", "0",
                                    "--no-fair-share"])
    assert ns.model == ["smollm2-135m", "qwen2.5-0.5b"]
    assert (ns.max_loaded_models, ns.memory_budget, ns.keep_alive, ns.fair_share) == \
        (1, 1000, 0.0, False)
    assert build_parser().parse_args(["serve"]).model is None


def test_entries_from_flags_name_each_model_and_refuse_twins():
    entries = entries_from_flags(["smollm2-135m", "qwen2.5-0.5b"], BASE, "smol")
    assert [e.name for e in entries] == ["smol", "qwen2.5-0.5b"]
    assert entries[0].aliases == ["smollm2-135m"] and entries[1].aliases == []
    assert entries[1].config.model == "qwen2.5-0.5b"
    assert entries[1].config.kv_cache_memory == 0.25  # the engine flags apply to each
    with pytest.raises(ValueError, match="both called"):
        entries_from_flags([None, "smollm2-135m"], BASE)


def test_models_file_gives_names_options_and_placement(tmp_path):
    entries = entries_from_file(write(tmp_path, '''
[[models]]
served_name = "smol"
aliases = ["small"]
pinned = true
share = 2

[[models]]
model = "qwen2.5-0.5b"
load_format = "dummy"
max_model_len = 2048
quantization = "int8"
'''), BASE)
    smol, qwen = entries
    assert (smol.name, smol.aliases, smol.pinned, smol.share) == ("smol", ["small"], True, 2.0)
    assert smol.config.model is None and smol.config.kv_cache_memory == 0.25
    assert qwen.name == "qwen2.5-0.5b" and not qwen.pinned and qwen.share == 1.0
    assert (qwen.config.load_format, qwen.config.max_model_len, qwen.config.quantization) == \
        ("dummy", 2048, "int8")


@pytest.mark.parametrize("text, message", [
    ('[[models]]\nquantisation = "int8"\n', "unknown keys"),
    ('[[models]]\nkv_cache_memory = -1\n', "kv_cache_memory"),
    ('[[models]]\nshare = 0\n', "share"),
    ('[[models]]\naliases = "x"\n', "aliases"),
    ('[[models]]\n[[models]]\n', "both called"),
    ('models = 3\n', "one or more"),
    ('[[models]\n', "models.toml"),
])
def test_models_file_errors_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        entries_from_file(write(tmp_path, text), BASE)


def test_memory_estimate_counts_weights_and_the_kv_pool():
    small, large = (estimate_memory(EngineConfig(kv_cache_memory=kv, device="cpu"))
                    for kv in (0.25, 0.5))
    assert large - small == pytest.approx(0.25 * 2**30, rel=0.01)  # the KV pool's share
    assert small > 0.25 * 2**30 + 50 * 2**20  # plus the weights
    float32 = estimate_memory(EngineConfig(kv_cache_memory=0.25, device="cpu",
                                           quantization="none"))
    assert float32 > small  # float weights take more than the GGUF's blocks
