"""Requests on LoRA adapters give what transformers + PEFT give: the same greedy tokens and
logits within float32 rounding, with several adapters and the base model in one batch, on a
tiny random Llama and on the real SmolLM2-135M."""

from __future__ import annotations

import copy

import pytest
import torch

from peregrine import LLM, LoRARequest, SamplingParams
from peregrine.attention_backend import AttentionMetadata
from tests.lora.conftest import make_adapter
from tests.models.parity import hf_cached_greedy, random_prompts

N_TOKENS = 24


def tiny_llm(path: str, **kwargs) -> LLM:
    """The tiny Llama with LoRA on, in float64 (no floating-point near-ties)."""
    return LLM(path, **{"dtype": "float64", "block_size": 4, "num_kv_blocks": 256,
                        "enable_lora": True, "max_loras": 3, **kwargs})


def reference(model: torch.nn.Module, prompt: list[int], n: int = N_TOKENS) -> list[int]:
    """transformers (+ PEFT) greedy tokens in float64, on a copy of the session's model."""
    return hf_cached_greedy(copy.deepcopy(model).double(), prompt, n)


def adapters_and_base(tiny_base, tiny_adapters) -> list[tuple[LoRARequest | None,
                                                              torch.nn.Module]]:
    """(request, reference model) for the base model and each adapter."""
    _, base = tiny_base
    return [(None, base)] + [(LoRARequest(name, a.path), a.model)
                             for name, a in tiny_adapters.items()]


def test_greedy_tokens_equal_peft_with_adapters_and_base_in_one_batch(tiny_base,
                                                                      tiny_adapters):
    path, _ = tiny_base
    llm = tiny_llm(path)
    steps: list[set[str | None]] = []
    llm.engine.batch_observer = lambda b: steps.append({s.request.lora_name for s in b.seqs})
    cases = adapters_and_base(tiny_base, tiny_adapters)
    prompts = random_prompts([13, 7, 21, 9], seed=3)
    loras = [lora for lora, _ in cases for _ in prompts]
    outs = llm.generate([{"prompt_token_ids": p} for _ in cases for p in prompts],
                        SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True),
                        lora_request=loras)
    got = [o.outputs[0].token_ids for o in outs]
    want = [reference(model, p) for _, model in cases for p in prompts]
    assert got == want
    assert [o.lora_request for o in outs] == loras
    assert {None, "all8", "attn4", "rs16"} in steps  # one batch ran all four
    llm.engine.check_invariants()


def test_logits_equal_peft_in_float32(tiny_base, tiny_adapters):
    """One flat batch of prompts on the base model and three adapters: every position's
    logits equal PEFT's within float32 rounding."""
    path, _ = tiny_base
    llm = tiny_llm(path, dtype="float32")
    cases = adapters_and_base(tiny_base, tiny_adapters)
    for lora, _ in cases[1:]:
        llm.engine.add_lora(lora)
    manager = llm.engine.lora
    manager.activate({lora.lora_name for lora, _ in cases[1:]})
    prompts = random_prompts([11, 6, 17, 9], seed=5)
    net = llm.engine.runner.model
    flat = torch.tensor([t for p in prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    slots = torch.cat([torch.full((len(p),), manager.slot_of(lora and lora.lora_name))
                       for p, (lora, _) in zip(prompts, cases)])
    meta = AttentionMetadata.prefill_only([len(p) for p in prompts])
    with torch.inference_mode(), manager.batch(slots):
        ours = net.compute_logits(net(flat, pos, meta)).split([len(p) for p in prompts])
    for p, (_, model), got in zip(prompts, cases, ours):
        with torch.no_grad():
            want = model(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_preemption_give_the_same_tokens(tiny_base, tiny_adapters):
    """Prompts prefilled 5 tokens a step, in a pool so small that sequences are preempted
    and recomputed: every adapter's tokens are still PEFT's."""
    path, _ = tiny_base
    llm = tiny_llm(path, max_num_batched_tokens=5, num_kv_blocks=24)
    cases = adapters_and_base(tiny_base, tiny_adapters)
    prompts = random_prompts([19, 14, 23, 10], seed=9)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True),
                        lora_request=[lora for lora, _ in cases])
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [
        reference(model, p) for p, (_, model) in zip(prompts, cases)]


def test_the_prefix_cache_never_serves_one_adapters_kv_to_another(tiny_base, tiny_adapters):
    path, base = tiny_base
    llm = tiny_llm(path)
    prompt = random_prompts([24], seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    all8 = LoRARequest("all8", tiny_adapters["all8"].path)
    first = llm.generate({"prompt_token_ids": prompt}, params)[0]
    on_adapter = llm.generate({"prompt_token_ids": prompt}, params, lora_request=all8)[0]
    again = llm.generate({"prompt_token_ids": prompt}, params, lora_request=all8)[0]
    assert on_adapter.num_cached_tokens == 0  # the base model's blocks were not reused
    assert again.num_cached_tokens > 0  # its own blocks are
    assert first.outputs[0].token_ids == reference(base, prompt, 8)
    assert on_adapter.outputs[0].token_ids == again.outputs[0].token_ids == reference(
        tiny_adapters["all8"].model, prompt, 8)


@pytest.fixture(scope="module")
def smollm2_adapters(hf_smollm2, tmp_path_factory):
    """Two random adapters of the real SmolLM2 (peft on transformers' float model): rank 8
    on every linear, rank 16 on attention."""
    model, _ = hf_smollm2
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {"every8": make_adapter(model, str(root / "every8"), seed=1, r=8, scale=0.05),
            "attn16": make_adapter(model, str(root / "attn16"), seed=2, r=16, scale=0.05,
                                   targets=["q_proj", "k_proj", "v_proj", "o_proj"])}


@pytest.fixture(scope="module")
def smollm2_lora_llm() -> LLM:
    """SmolLM2 in float32 (its GGUF dequantized, as transformers reads it) with LoRA on."""
    return LLM(quantization="none", kv_cache_memory=0.1, enable_lora=True, max_loras=2)


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_peft_with_adapters_and_base_in_one_batch(
        hf_smollm2, smollm2_adapters, smollm2_lora_llm):
    """Two adapters and the base model in one batch, 24 greedy tokens each on chat
    prompts."""
    model, _ = hf_smollm2
    llm = smollm2_lora_llm
    tok = llm.get_tokenizer()
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in (
        "What is the capital of France?", "Name three fruits.", "Write a haiku about rain.")]
    cases = [(None, model)] + [(LoRARequest(n, a.path), a.model)
                               for n, a in smollm2_adapters.items()]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True),
                        lora_request=[lora for lora, _ in cases])
    for p, (_, ref), out in zip(prompts, cases, outs):
        assert out.outputs[0].token_ids == hf_cached_greedy(ref, p, N_TOKENS)


@pytest.mark.slow
def test_smollm2_logits_equal_peft(hf_smollm2, smollm2_adapters, smollm2_lora_llm):
    """The real model's logits on an adapter, as one prefill, equal PEFT's in float32 (slow
    for its setup: transformers' model, peft, and the engine load; the tiny Llama's tests
    above are the fast siblings)."""
    model, _ = hf_smollm2
    adapter = smollm2_adapters["every8"]
    llm = smollm2_lora_llm
    llm.engine.add_lora(LoRARequest("every8", adapter.path))
    llm.engine.lora.activate({"every8"})
    ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    net = llm.engine.runner.model
    slots = torch.full((len(ids),), llm.engine.lora.slot_of("every8"))
    with torch.inference_mode(), llm.engine.lora.batch(slots):
        ours = net.compute_logits(net(torch.tensor(ids), torch.arange(len(ids)),
                                      AttentionMetadata.prefill_only([len(ids)])))
    with torch.no_grad():
        want = adapter.model(torch.tensor([ids])).logits[0].float()
        base = model(torch.tensor([ids])).logits[0].float()
    assert (want - base).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(ours, want, atol=2e-4, rtol=1e-4)
