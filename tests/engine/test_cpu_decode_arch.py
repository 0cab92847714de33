"""The fused CPU step on the models people download beyond Llama: Qwen3 (per-head q/k
norms, head_dim * heads != hidden), Gemma 2 (four (1 + w) norms per layer, GeGLU, a
query_pre_attn_scalar scale, attention soft-cap, windowed and global layers) and Gemma 3
(q/k norms, local layers on their own RoPE base). With int4 and int8 weights it computes
what the modules compute (the same check as the Llama tests), each feature left out is
caught, and through the engine its greedy tokens equal the eager modules' and do not depend
on batching, chunked prefill, preemption or prefix caching."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from peregrine import LLM, SamplingParams
from peregrine.engine.cpu_decode import FusedDecodeRunner, fusable
from peregrine.kernels.cpu import q8_ops
from peregrine.models.gemma import GemmaForCausalLM
from tests.conftest import tiny_config_dir
from tests.engine.test_cpu_decode import Harness, assert_same_computation, int8_dots, tiny_model

WINDOW = 8  # Gemma's local window: the contexts below reach 5x past it
ARCHS = {
    # 4 heads of 32: the attention width (128) is not the hidden size (96)
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32),
    # a soft-cap the scores of these weights reach (they are ~0.5), a scale not head_dim's
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=24,
                   query_pre_attn_scalar=40, sliding_window=WINDOW, attn_logit_softcapping=1.0,
                   final_logit_softcapping=3.0),
    # local, global, local; global layers on a scaled 1e6 base, local ones on 1e4
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=24,
                   query_pre_attn_scalar=32, sliding_window=WINDOW, sliding_window_pattern=2,
                   rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
}
QUANTS = {"int4-g32": ("int4", 32), "int8": ("int8", None)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=sorted(QUANTS))
def net(request, tmp_path_factory, arch):
    net = tiny_model(tmp_path_factory, QUANTS[request.param], **ARCHS[arch])
    with torch.no_grad():  # Gemma's norms scale by 1 + w: keep them near 1 as Llama's
        for module in net.modules():
            if getattr(module, "weight_offset", 0.0):
                module.weight.sub_(module.weight_offset)
    return net


def test_the_models_are_what_the_cases_say(net, arch):
    cfg = net.config
    assert fusable(net, []) is None
    if arch == "qwen3":
        assert cfg.qk_norm and cfg.num_heads * cfg.head_dim != cfg.hidden_size
    else:
        assert isinstance(net, GemmaForCausalLM) and cfg.hidden_act == "gelu_pytorch_tanh"
        assert [cfg.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
        assert net.layers[0].self_attn.scale != cfg.head_dim ** -0.5
    if arch == "gemma2":
        assert cfg.attn_logit_softcapping == 1.0 and not cfg.qk_norm
    if arch == "gemma3":
        assert cfg.qk_norm and net.rotary_local is not None
        assert not torch.equal(net.rotary.cos_sin[5], net.rotary_local.cos_sin[5])


def test_pure_decode_steps_across_many_blocks_and_past_the_window(net):
    Harness(net, 8).decode_all([1, 3, 4, 5, 8, 17, 30, 41], steps=4)


def test_prefill_chunks_and_verification_entries(net):
    h = Harness(net, 5)
    h.prefill([6, 11, 19, 0, 8])
    for chunk in (9, 7, 1):  # sequence 3's prompt in chunks crossing the window
        h.step([(0, 1), (1, 2), (2, 4), (4, 3), (3, chunk)], 4)


@contextlib.contextmanager
def left_out(net, arch: str) -> Iterator[None]:
    """The model as a fused step without `arch`'s own feature would see it: no q/k norms
    (Qwen3), no soft-cap (Gemma 2), one RoPE table for every layer (Gemma 3)."""
    attn = [layer.self_attn for layer in net.layers]
    if arch == "qwen3":
        for a in attn:
            a.has_qk_norm = False
        yield
        for a in attn:
            a.has_qk_norm = True
    elif arch == "gemma2":
        for a in attn:
            a.softcap = None
        yield
        for a in attn:
            a.softcap = net.config.attn_logit_softcapping
    else:
        local, net.rotary_local = net.rotary_local, None
        yield
        net.rotary_local = local


def test_each_feature_left_out_is_caught(net, arch):
    """The check has teeth for each model's own feature: a fused step built without it
    fails assert_same_computation."""
    h = Harness(net, 4)
    h.prefill([9, 22, 5, 30])
    with left_out(net, arch):
        wrong = FusedDecodeRunner(q8_ops(), net, h.pools["fused"])
    ids = torch.randint(0, h.vocab, (7,), generator=h.gen)
    positions, meta = h.meta([(0, 1), (1, 1), (2, 2), (3, 3)])
    with torch.inference_mode():
        with int8_dots(True):
            eager = net(ids, positions, meta, h.pools["eager"])
            fused = wrong.run(ids, positions, meta)
        with int8_dots(False):
            near_float = net(ids, positions, meta, h.pools["float"])
    with pytest.raises(AssertionError):
        assert_same_computation(fused, eager, near_float)


# --- through the engine -----------------------------------------------------------------------

# Small enough to chunk every prompt and to preempt under the load below.
ENGINE = dict(load_format="dummy", quantization="int4", block_size=4, max_num_seqs=6, seed=7)
SHARED = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]  # a common prefix of 3 blocks


def workload() -> list[dict]:
    """Prompts sharing a prefix (prefix-cache hits), longer than a step's token budget
    (chunked prefill), past the window, and together more than a small pool holds."""
    return [{"prompt_token_ids": SHARED + [100 + i] * (3 + 5 * i)} for i in range(6)]


def greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, arch) -> str:
    return tiny_config_dir(tmp_path_factory, **ARCHS[arch], hidden_size=96,
                           intermediate_size=160, num_hidden_layers=3, vocab_size=300)


def test_engine_greedy_fused_equals_eager_and_survives_batching(engine_dir):
    """Alone with room to spare, the fused engine gives the eager modules' tokens; batched
    in a pool that chunks every prompt, preempts and reuses cached prefixes, the same."""
    prompts = workload()
    roomy = LLM(engine_dir, num_kv_blocks=256, **ENGINE)
    assert roomy.engine.runner.fused is not None
    alone = [greedy(roomy, [p])[0] for p in prompts]
    assert len({tuple(t) for t in alone}) > 1  # the prompts lead somewhere different
    eager = LLM(engine_dir, num_kv_blocks=256, enforce_eager=True, **ENGINE)
    assert eager.engine.runner.fused is None
    assert greedy(eager, prompts) == alone
    tight = LLM(engine_dir, num_kv_blocks=40, max_num_batched_tokens=24, **ENGINE)
    assert tight.engine.runner.fused is not None
    assert greedy(tight, prompts) == alone
    stats = tight.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    tight.engine.check_invariants()
