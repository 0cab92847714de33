"""Shared fixtures: the real default model, transformers references, tiny random models."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    from peregrine.models.registry import default_gguf_path
    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2_q4_k_m_path(smollm2_path: str, tmp_path_factory) -> str:
    """SmolLM2-135M requantized into llama.cpp's Q4_K_M recipe (Q4_K, Q5_0, Q6_K and Q8_0
    tensors) by peregrine's own K-quant writer: a file as people download them."""
    from peregrine.quantization.kquants import write_recipe
    path = str(tmp_path_factory.mktemp("kquants") / "smollm2-Q4_K_M.gguf")
    write_recipe(smollm2_path, path, "Q4_K_M")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: str):
    """transformers' own model and tokenizer, loaded from the same GGUF (the reference)."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2_llm():
    """One engine on the real default model with the default settings (the GGUF's own
    Q4_1/Q8_0 blocks, int8 activations, fused decode), shared by read-only tests: the
    engine's invariants hold on the path users get."""
    from peregrine import LLM
    return LLM(kv_cache_memory=0.5)


@pytest.fixture(scope="session")
def smollm2_float_llm():
    """One engine on the real default model computing in float32 (`quantization="none"`):
    the reference path of the parity tests against transformers."""
    from peregrine import LLM
    return LLM(kv_cache_memory=0.5, quantization="none")


def write_hf_checkpoint(tmp_path, family: str, **overrides) -> tuple[str, "torch.nn.Module"]:
    """A tiny random transformers model of `family` saved as a HF directory; returns
    (directory, the transformers model)."""
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    if family == "phi3":  # its defaults are ids of the real 32k vocabulary
        base.update(pad_token_id=0, eos_token_id=2)
    base.update(overrides)
    cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[family]
    cfg = cls(**base)
    moe = family in ("mixtral", "qwen2_moe", "qwen3_moe")
    newer = moe or family in ("qwen3", "phi3", "gemma2", "gemma3")
    if newer:  # the eager path is transformers' reference (it alone soft-caps everywhere)
        cfg._attn_implementation = "eager"
    if moe:  # the per-expert loop, not torch's grouped_mm
        cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # biases are zero at init, norms constant; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif newer and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / family)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "config.json")) as f:
        json.load(f)  # saved and readable
    return path, model


TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def tiny_config_dir(tmp_path_factory, **overrides) -> str:
    """A directory holding only a config.json of a tiny Llama (run with dummy weights)."""
    path = tmp_path_factory.mktemp("tiny")
    with open(path / "config.json", "w") as f:
        json.dump({**TINY_LLAMA, **overrides}, f)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return tiny_config_dir(tmp_path_factory)


def make_tiny_llm(model_dir: str, **kwargs):
    """An engine on the tiny random model in float64 (no floating-point near-ties)."""
    from peregrine import LLM
    defaults = dict(load_format="dummy", dtype="float64", num_kv_blocks=256, block_size=4)
    return LLM(model_dir, **{**defaults, **kwargs})


@pytest.fixture(scope="session")
def quant_ops():
    """The C++ quantized-linear kernels; the first build compiles (~1 min), later sessions
    load the cache."""
    from peregrine.kernels.cpu import cpu_supports_kernels, quant_ops
    if not cpu_supports_kernels():
        pytest.skip("this CPU has no AVX2/FMA: the C++ kernels do not apply")
    ops = quant_ops()
    assert ops is not None, "the C++ kernels failed to build (see the logged warning)"
    return ops


def q8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What q8_decode.cpp's int8-dot linears do to x [M, K] (int8 per run of 32 values):
    the dequantized x and d [M, K/32]."""
    from peregrine.layers.quant_formats import quantize_activations
    return quantize_activations(x, 127.0)


def assert_engine_drained(engine) -> None:
    """Every request is done: the pool's bookkeeping is consistent and every block is free
    (cached ones count: they are evictable)."""
    engine.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
