"""Pooled embeddings from the decoder (LLMEngine.embed, LLM.embed): the mean or the last of
the model's final hidden states, normalized, whatever else runs in the batch."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata

TEXTS = ["The sky is blue.", "Once upon a time, in a land far away, there lived a king.",
         "42"]


def hidden_states(llm, ids: list[int]) -> torch.Tensor:
    """The model's final hidden states of one sequence, run on its own."""
    with torch.inference_mode():
        return llm.engine.runner.model(torch.tensor(ids), torch.arange(len(ids)),
                                       AttentionMetadata.prefill_only([len(ids)])).float()


def test_shape_and_unit_norm(smollm2_llm):
    e = smollm2_llm.embed(TEXTS)
    hidden = smollm2_llm.engine.model_config.hidden_size
    assert e.shape == (3, hidden) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_equals_a_manual_pool_of_the_hidden_states(smollm2_llm, pooling):
    tok = smollm2_llm.get_tokenizer()
    e = smollm2_llm.embed(TEXTS, pooling=pooling)
    for i, text in enumerate(TEXTS):
        h = hidden_states(smollm2_llm, tok.encode(text))
        manual = h.mean(0) if pooling == "mean" else h[-1]
        assert torch.allclose(e[i], torch.nn.functional.normalize(manual, dim=-1),
                              atol=1e-4), (pooling, i)
    raw = smollm2_llm.embed(TEXTS[1], pooling=pooling, normalize=False)[0]
    h = hidden_states(smollm2_llm, tok.encode(TEXTS[1]))
    assert torch.allclose(raw, h.mean(0) if pooling == "mean" else h[-1], atol=1e-4)


def test_mean_and_last_differ_and_mixed_pooling_in_one_batch(smollm2_llm):
    ids = [smollm2_llm.get_tokenizer().encode(t) for t in TEXTS]
    mean = smollm2_llm.engine.embed(ids, "mean")
    last = smollm2_llm.engine.embed(ids, "last")
    assert not torch.allclose(mean, last, atol=1e-2)
    mixed = smollm2_llm.engine.embed(ids, ["mean", "last", "mean"])
    assert torch.allclose(mixed[0], mean[0], atol=1e-5)
    assert torch.allclose(mixed[1], last[1], atol=1e-5)


def test_batches_split_by_the_token_budget_give_the_same_rows(smollm2_llm):
    ids = [smollm2_llm.get_tokenizer().encode(t) for t in TEXTS] * 3
    engine = smollm2_llm.engine
    whole = engine.embed(ids, "mean")
    saved = engine.config.max_num_batched_tokens
    engine.config.max_num_batched_tokens = 8  # every sequence in a batch of its own
    try:
        split = engine.embed(ids, "mean")
    finally:
        engine.config.max_num_batched_tokens = saved
    assert torch.allclose(whole, split, atol=1e-4)


def test_refuses_empty_out_of_vocab_and_too_long(smollm2_llm):
    engine = smollm2_llm.engine
    with pytest.raises(ValueError, match="empty"):
        engine.embed([[1, 2], []])
    with pytest.raises(ValueError, match="token ids"):
        engine.embed([[engine.model_config.vocab_size]])
    with pytest.raises(ValueError, match="at most"):
        engine.embed([[1] * (engine.max_model_len + 1)])
    with pytest.raises(ValueError, match="pooling"):
        engine.embed([[1, 2]], "cls")  # type: ignore[arg-type]
