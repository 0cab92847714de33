"""Adapter slots: at most max_loras adapters resident; an idle one is evicted least
recently used first; one with running requests never is (a request whose adapter finds no
slot waits, while requests on resident adapters and on the base model go on)."""

from __future__ import annotations

import pytest

from peregrine import LLM, LoRARequest, SamplingParams
from peregrine.lora.errors import AdapterBusyError, AdapterNotFoundError, InvalidAdapterError
from tests.lora.conftest import make_adapter
from tests.models.parity import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def tiny_llm(path: str, max_loras: int) -> LLM:
    return LLM(path, dtype="float64", block_size=4, num_kv_blocks=256, enable_lora=True,
               max_loras=max_loras)


@pytest.fixture
def requests(tiny_adapters) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, a.path) for name, a in tiny_adapters.items()}


def test_the_least_recently_used_idle_adapter_is_evicted(tiny_base, requests):
    llm = tiny_llm(tiny_base[0], max_loras=2)
    prompt = {"prompt_token_ids": random_prompts([8])[0]}
    manager = llm.engine.lora
    alone = {name: llm.generate(prompt, GREEDY, lora_request=r)[0].outputs[0].token_ids
             for name, r in requests.items()}  # all8, attn4, then rs16 evicts all8
    assert sorted(manager.slots) == ["attn4", "rs16"]
    loads = manager.num_slot_loads
    llm.generate(prompt, GREEDY, lora_request=requests["attn4"])  # resident: no copy
    assert manager.num_slot_loads == loads
    again = llm.generate(prompt, GREEDY, lora_request=requests["all8"])[0]
    assert sorted(manager.slots) == ["all8", "attn4"]  # rs16 was the least recently used
    assert again.outputs[0].token_ids == alone["all8"]  # reloaded into another slot


def test_an_adapter_with_running_requests_is_never_evicted(tiny_base, requests):
    """One slot: a request on another adapter waits until the running one finishes; the
    base model's requests run beside it meanwhile."""
    llm = tiny_llm(tiny_base[0], max_loras=1)
    prompts = random_prompts([6, 7, 9], seed=2)
    want = {name: llm.generate({"prompt_token_ids": prompts[0]}, GREEDY,
                               lora_request=requests[name])[0].outputs[0].token_ids
            for name in ("all8", "attn4")}
    engine = llm.engine
    long = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.add_request({"prompt_token_ids": prompts[0]}, GREEDY,
                            lora_request=requests["all8"])
    llm.step()
    second = llm.add_request({"prompt_token_ids": prompts[0]}, GREEDY,
                             lora_request=requests["attn4"])
    base = llm.add_request({"prompt_token_ids": prompts[1]}, long)
    finished: dict[str, list[int]] = {}
    running_together = []
    while engine.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        running = {s.request.request_id for s in engine.scheduler.running}
        running_together.append(running)
        assert not {first, second} <= running  # never both adapters at once
        for rid, name in ((first, "all8"), (second, "attn4")):
            if rid in running:
                assert engine.lora.slots == [name]
    assert any({first, base} <= r for r in running_together)  # base beside the adapter
    assert finished[first] == want["all8"] and finished[second] == want["attn4"]
    engine.check_invariants()


def test_more_adapters_than_slots_in_one_step_is_a_bug_the_manager_refuses(tiny_base,
                                                                           requests):
    llm = tiny_llm(tiny_base[0], max_loras=2)
    for r in requests.values():
        llm.engine.add_lora(r)
    with pytest.raises(RuntimeError, match="3 adapters in one step, 2 slots"):
        llm.engine.lora.activate(set(requests))


def test_removing_an_adapter_frees_its_slot_but_not_while_it_has_requests(tiny_base,
                                                                          requests):
    llm = tiny_llm(tiny_base[0], max_loras=2)
    prompt = {"prompt_token_ids": random_prompts([8])[0]}
    llm.generate(prompt, GREEDY, lora_request=requests["all8"])
    assert llm.engine.list_loras() == ["all8"]
    rid = llm.add_request(prompt, GREEDY, lora_request=requests["all8"])
    with pytest.raises(AdapterBusyError):
        llm.engine.remove_lora("all8")
    llm.abort(rid)
    llm.engine.remove_lora("all8")
    assert llm.engine.lora.slots == [None, None] and llm.engine.list_loras() == []
    with pytest.raises(AdapterNotFoundError):
        llm.engine.remove_lora("all8")


def test_adapters_that_do_not_fit_the_model_are_refused(tiny_base, tmp_path, requests):
    """Another model's adapter (other shapes), a second path under a taken name, and
    adapters on an engine without LoRA are ValueErrors when the request is added."""
    import transformers
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    wrong = make_adapter(other, str(tmp_path / "other"), seed=5, r=4)
    llm = tiny_llm(tiny_base[0], max_loras=1)
    prompt = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(InvalidAdapterError, match="another base model"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("other", wrong.path))
    llm.generate(prompt, GREEDY, lora_request=requests["all8"])
    with pytest.raises(InvalidAdapterError, match="already loaded from"):
        llm.generate(prompt, GREEDY,
                     lora_request=LoRARequest("all8", requests["attn4"].lora_path))
    assert not llm.engine.has_unfinished_requests()
    plain = LLM(tiny_base[0], dtype="float64", num_kv_blocks=64)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate(prompt, GREEDY, lora_request=requests["all8"])
