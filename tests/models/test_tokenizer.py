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


# A SentencePiece vocabulary as llama.cpp's converter writes Phi-3's and Gemma's
# (tokenizer.ggml.model "llama": tokens, scores, types; no merges).
_S = "\u2581"
_PIECES = [_S, "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", _S + "h",
           _S + "hello", _S + "w", "or", _S + "wor", _S + "world", "ld", "wor", "world",
           _S + _S, "a", _S + "a"]
_BYTES = [f"<0x{b:02X}>" for b in (0x0A, 0x20, 0xC3, 0xA9, 0x21)]
SPM_META = {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<start_of_turn>", *_BYTES,
                                      *_PIECES],
            "tokenizer.ggml.token_type": [2, 3, 3, 3] + [6] * len(_BYTES) + [1] * len(_PIECES),
            "tokenizer.ggml.scores": [0.0] * (4 + len(_BYTES))
            + [-float(i) for i in range(len(_PIECES))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
SPM_TEXTS = ["hello world", "hello  world!", "é\nhello", "<start_of_turn>hello world",
             " hello", "a hello"]


def spm_meta(arch: str) -> dict:
    """SPM_META in a file of `arch` (Gemma's converter turns the prefix space off)."""
    extra = {"tokenizer.ggml.add_space_prefix": False} if arch.startswith("gemma") else {}
    return {"general.architecture": arch, **SPM_META, **extra}


@pytest.mark.parametrize("arch", ["phi3", "gemma2"])
def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path, arch):
    """Our SentencePiece BPE equals transformers' tokenizer of the same GGUF file: merges
    from scores (Gemma: token order), the prefix space (not Gemma's), byte fallback,
    control tokens kept whole, BOS added; decoding gives the text back."""
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from tests.models.gguf_writer import write_tokenizer
    meta = spm_meta(arch)
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    write_tokenizer(w, meta)
    w.add_tensor("token_embd.weight", np.zeros((len(meta["tokenizer.ggml.tokens"]), 8),
                                               np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    tok = Tokenizer.from_gguf_metadata(meta)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text.replace(
            "<start_of_turn>", "")
    assert tok.encode("hello world") == ([1, 22, 26] if arch == "phi3" else [1, 20, 26])
    assert tok.is_special(3) and tok.encode("é")[-2:] == [6, 7]  # <0xC3> <0xA9>


def test_sentencepiece_without_a_byte_token_gives_unk():
    """As llama.cpp: a character with neither a piece nor a byte token becomes <unk>."""
    tok = Tokenizer.from_gguf_metadata(spm_meta("phi3"))
    assert tok.encode("hex", add_special_tokens=False) == [9, 17, 0]  # ▁ he <unk>
