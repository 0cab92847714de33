"""The tokenizer built from GGUF metadata, its chat template and special tokens."""

from __future__ import annotations

import pytest

from peregrine.models.errors import ModelLoadError
from peregrine.models.tokenizer import Tokenizer

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnew lines",
         "Unicode: café, naïve, 東京, emoji 🦅🔥", "<|im_start|>user\nhi<|im_end|>",
         "def f(x):\n    return x ** 2  # square", "It's a dog's life; they'll see."]


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    from peregrine.models.loader import load_tokenizer
    return load_tokenizer(smollm2_path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_round_trips(tok, hf_smollm2, text):
    _, hf_tok = hf_smollm2
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_one_by_one(tok):
    # SmolLM2's pre-tokenizer (llama.cpp "smollm") isolates each digit.
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"


def test_special_tokens_and_eos(tok):
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1
    assert tok.encode("<|im_end|>") == [2] and tok.is_special(2)
    assert tok.decode([2, 28, 2], skip_special_tokens=True) == tok.decode([28])


def test_chat_template_matches_transformers(tok, hf_smollm2):
    _, hf_tok = hf_smollm2
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for msgs in convs:
        want = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert tok.apply_chat_template(msgs) == want
        assert tok.encode_chat(msgs) == hf_tok.encode(want, add_special_tokens=False)


def test_non_bpe_gguf_tokenizer_is_refused_clearly():
    with pytest.raises(ModelLoadError, match="not supported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert"})
