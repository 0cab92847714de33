"""`estimate`: the hand calculation of the docs, fits and errors (no timing assertions)."""

from __future__ import annotations

import pytest

from peregrine.config import EngineConfig
from peregrine.estimate import EstimateOptions, estimate
from peregrine.models.errors import ModelLoadError

H100_BYTES = 81559 * 2**20  # devices.json: what the driver reports


def llama3_70b_int4(**kw):
    config = EngineConfig(model="llama-3-70b", quantization="int4", max_model_len=4096,
                          max_num_seqs=8, **kw)
    return estimate(config, EstimateOptions(devices=["H100"]))


def test_llama3_70b_int4_8x4096_on_h100_is_the_hand_calculation():
    r = llama3_70b_int4()
    # docs/estimate.md, "By hand": h 8192, I 28672, 80 layers, 64 heads, 8 KV heads of 128
    qkv = 10240 * 8192 // 2 + 2 * 2 * 10240 * (8192 // 128)  # packed nibbles + f16 scale, offset
    o = 8192 * 8192 // 2 + 4 * 8192 * (8192 // 128)
    gate_up = 57344 * 8192 // 2 + 4 * 57344 * (8192 // 128)
    down = 8192 * 28672 // 2 + 4 * 8192 * (28672 // 128)
    linears = 80 * (qkv + o + gate_up + down)
    lm_head = 128256 * 8192 + 4 * 128256  # int8 per channel under int4
    embedding = 128256 * 8192 * 2  # bf16
    norms = (2 * 80 + 1) * 8192 * 2
    rotary = 4096 * 2 * 128 * 4  # float32 cos/sin of max_model_len positions
    weights = linears + lm_head + embedding + norms + rotary
    assert r["weights_bytes"] == weights == 39_523_980_288
    kv_per_token = 2 * 80 * 8 * 128 * 2
    assert r["kv_cache_bytes_per_token"] == kv_per_token == 327_680
    assert r["kv_blocks"] == 8 * 4096 // 16
    assert r["kv_cache_bytes"] == 8 * 4096 * kv_per_token == 10 * 2**30
    # the largest step: 8192 tokens through the MLP (residual, x, gate_up, act) in bf16,
    # plus ids, positions and the float32 rotary rows of each token
    act = 8192 * (2 * 8192 + 3 * 28672) * 2 + 8192 * (8 + 8 + 2 * 128 * 4)
    assert r["activation_bytes"] == act
    runtime = 2**30
    assert r["total_bytes"] == weights + 10 * 2**30 + act + runtime
    (h100,) = r["devices"]
    assert h100["name"] == "H100" and h100["count"] == 1 and h100["fits_serving"]
    budget = 0.9 * H100_BYTES - weights - act - runtime
    assert h100["kv_budget_bytes"] == round(budget)
    assert h100["max_batch"] == int(budget // (16 * kv_per_token)) // 256 == 25
    # the loader builds the bf16 model first: 141 GB does not fit one H100
    assert not h100["fits_load"] and not h100["fits"]


def test_mixtral_8x7b_int4_counts_every_expert():
    """Every expert's projections are quantized linears, the routers stay bf16; FLOPs use
    the active parameters (2 of 8 experts)."""
    config = EngineConfig(model="mixtral-8x7b", quantization="int4", max_model_len=4096,
                          max_num_seqs=8)
    r = estimate(config, EstimateOptions(devices=["H100"]))
    h, i = 4096, 14336

    def int4(n: int, k: int) -> int:  # packed nibbles + f16 scale and offset per 128
        return n * k // 2 + 4 * n * (k // 128)
    experts = 8 * (int4(2 * i, h) + int4(h, i))
    layer = int4(6144, h) + int4(h, h) + 8 * h * 2 + experts
    weights = (32 * layer + 32000 * h + 4 * 32000 + 32000 * h * 2 + 65 * h * 2
               + 4096 * 2 * 128 * 4)
    assert r["weights_bytes"] == weights
    assert r["params"] == 46_702_792_704


def test_json_fields():
    r = llama3_70b_int4()
    for key in ("weights_bytes", "kv_cache_bytes_per_token", "kv_cache_bytes",
                "activation_bytes", "total_bytes", "devices"):
        assert key in r
    for key in ("name", "count", "fits", "max_batch", "decode_tok_s", "prefill_tok_s"):
        assert key in r["devices"][0]
    assert r["devices"][0]["decode_tok_s"] > 0 and r["devices"][0]["prefill_tok_s"] > 0


def test_kv_cache_dtype_and_sliding_window():
    auto = llama3_70b_int4()
    int8 = llama3_70b_int4(kv_cache_dtype="int8")
    assert int8["kv_cache_bytes_per_token"] == 2 * 80 * 8 * (128 + 4)
    assert int8["kv_cache_bytes"] < auto["kv_cache_bytes"]
    assert int8["devices"][0]["max_batch"] > auto["devices"][0]["max_batch"]
    # Mistral-7B's window of 4096: a 32k sequence holds the window's blocks, not 32k tokens
    opts = EstimateOptions(devices=["H100"])
    mistral = estimate(EngineConfig(model="mistral-7b", max_model_len=32768, max_num_seqs=4),
                       opts)
    assert mistral["kv_blocks_per_sequence"] == 4096 // 16 + 1
    llama = estimate(EngineConfig(model="llama-3-8b", max_model_len=8192, max_num_seqs=4), opts)
    assert llama["kv_blocks_per_sequence"] == 8192 // 16


def test_tensor_parallel_splits_weights_and_kv():
    one = estimate(EngineConfig(model="llama-2-70b", max_model_len=4096, max_num_seqs=8),
                   EstimateOptions(devices=["A100 80GB"], tensor_parallel_size=1))
    four = estimate(EngineConfig(model="llama-2-70b", max_model_len=4096, max_num_seqs=8),
                    EstimateOptions(devices=["A100 80GB"], tensor_parallel_size=4))
    assert not one["devices"][0]["fits"] and four["devices"][0]["fits"]
    assert four["devices"][0]["per_device_bytes"] < one["devices"][0]["per_device_bytes"] / 3


@pytest.mark.parametrize("config,opts,error", [
    (dict(model="no-such-model"), {}, ModelLoadError),
    (dict(model="llama-2-7b", max_model_len=-1), {}, ValueError),
    (dict(model="llama-2-7b", max_model_len=8192), {}, ValueError),  # past its 4096
    (dict(model="llama-2-7b"), dict(prompt_len=-5), ValueError),
    (dict(model="llama-2-7b"), dict(tensor_parallel_size=0), ValueError),
    (dict(model="llama-2-7b", quantization="gguf"), {}, ValueError),  # not a GGUF file
    (dict(model="llama-2-7b"), dict(devices=["TPU"]), ValueError),
])
def test_bad_input_is_a_clear_error(config, opts, error):
    with pytest.raises(error):
        estimate(EngineConfig(**config), EstimateOptions(**opts))


@pytest.mark.parametrize("quantization", ["gguf", "int4"])
def test_smollm2_on_this_cpu_matches_the_engine(quantization):
    """End to end: the CPU breakdown `estimate` prints is what an engine built with its
    block count allocates (weights to the byte, the KV pool to the byte)."""
    from peregrine import LLM
    from peregrine.memory_model import held_kv_bytes, held_weight_bytes
    r = estimate(EngineConfig(quantization=quantization, device="cpu", max_model_len=1024,
                              max_num_seqs=3), EstimateOptions(devices=["CPU"]))
    llm = LLM(quantization=quantization, max_model_len=1024, max_num_seqs=3,
              num_kv_blocks=r["kv_blocks"])
    weights = held_weight_bytes(llm.engine.loaded.model)
    pool = held_kv_bytes(llm.engine.kv_caches)
    assert r["weights_bytes"] == weights
    assert r["kv_cache_bytes"] == pool == 3 * 1024 * 2 * 30 * 3 * 64 * 4
    (cpu,) = r["devices"]
    assert cpu["kind"] == "cpu" and cpu["fits"] and "measured" in cpu["efficiency_source"]
