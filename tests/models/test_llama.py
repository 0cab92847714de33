"""Our Llama-family forward pass matches transformers' own implementation."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint

CASES = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-tied-mqa": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen2-bias": ("qwen2", {}),
    "mistral-sliding-window": ("mistral", dict(sliding_window=8)),
}


def our_logits(path: str, ids: list[list[int]]) -> list[torch.Tensor]:
    net = load_model(path).model
    meta = AttentionMetadata.prefill_only([len(s) for s in ids])
    flat = torch.tensor([t for s in ids for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in ids])
    with torch.inference_mode():
        logits = net.compute_logits(net(flat, pos, meta))
    return list(logits.split([len(s) for s in ids]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    family, overrides = CASES[case]
    path, ref = write_hf_checkpoint(tmp_path, family, **overrides)
    g = torch.Generator().manual_seed(1)
    # Two sequences in one flat batch; the second is longer than the sliding window.
    ids = [torch.randint(0, 256, (7,), generator=g).tolist(),
           torch.randint(0, 256, (29,), generator=g).tolist()]
    ours = our_logits(path, ids)
    for seq, got in zip(ids, ours):
        with torch.no_grad():
            want = ref(torch.tensor([seq])).logits[0].float()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_config_of_checkpoint_is_read(tmp_path):
    path, _ = write_hf_checkpoint(tmp_path, "mistral", sliding_window=8)
    cfg = load_model(path).config
    assert (cfg.architecture, cfg.sliding_window, cfg.num_kv_heads) == ("mistral", 8, 2)
    path, _ = write_hf_checkpoint(tmp_path, "qwen2")
    cfg = load_model(path).config
    assert cfg.attention_bias and cfg.sliding_window is None


def test_greedy_matches_transformers_on_smollm2(smollm2_float_llm, hf_smollm2):
    """Same GGUF weights, same prompt ids: the same 48 greedy tokens for 8 varied prompts."""
    from peregrine import SamplingParams
    hf_model, _ = hf_smollm2
    tok = smollm2_float_llm.get_tokenizer()
    prompts = [
        "What is the capital of France?",
        "Write a haiku about autumn leaves.",
        "Explain recursion to a five-year-old.",
        "List three uses of copper.",
        "def fibonacci(n):",
        "Translate 'good morning' into Spanish and German.",
        "What is 17 times 23?",
        "Tell me a short story about a robot who learns to paint.",
    ]
    chats = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts[:6]]
    raws = [tok.encode(p) for p in prompts[6:]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = smollm2_float_llm.generate([{"prompt_token_ids": ids} for ids in chats + raws],
                                      params)
    for ids, out in zip(chats + raws, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, 48)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (with its KV cache), running past EOS."""
    out, past, cur = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(cur, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            cur = torch.tensor([[out[-1]]])
    return out
