"""The plain-PyTorch BERT encoder on all-MiniLM-L6-v2 against sentence-transformers (the
reference): same embeddings, whatever the batch around a sentence."""

from __future__ import annotations

import zipfile

import pytest
import torch

from peregrine.models.errors import PromptTooLongError
from peregrine.models.sentence_encoder import (SentenceEncoder, default_embedding_zip,
                                               load_sentence_encoder)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "a",
    "Paris is the capital and most populous city of France.",
    "Transformers use self-attention to mix information between tokens, layer after layer.",
    "Ünïcödé façade — naïve café, 東京タワー and emoji 🦅!",
    "1234 5678 3.14159 2**16 = 65536",
    "def embed(texts): return model.encode(texts, normalize_embeddings=True)",
    "   leading and trailing spaces   ",
    "THE SAME SENTENCE IN CAPITALS IS LOWERCASED BY THE TOKENIZER",
    "word " * 120,
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> torch.Tensor:
    """sentence-transformers' embeddings of SENTENCES, from the same package's files."""
    st = pytest.importorskip("sentence_transformers")
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(default_embedding_zip()) as zf:
        zf.extractall(folder)
    model = st.SentenceTransformer(str(folder), device="cpu")
    return torch.tensor(model.encode(SENTENCES, batch_size=4))


def test_config_read_from_the_package(encoder):
    assert encoder.name == "all-minilm-l6-v2"
    assert (encoder.dim, encoder.max_seq_length, encoder.pooling) == (384, 256, "mean")
    assert encoder.normalize and encoder.vocab_size == 30522


def test_embeddings_equal_sentence_transformers(encoder, reference):
    ids = [e.token_ids for e in encoder.tokenize(SENTENCES)]
    ours = encoder.embed(ids)
    cos = torch.nn.functional.cosine_similarity(ours, reference)
    assert cos.min() > 0.999, cos
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_a_sentence_alone_equals_it_in_a_padded_batch(encoder):
    ids = [e.token_ids for e in encoder.tokenize(SENTENCES)]
    batch = encoder._embed_batch(ids)  # one batch, every row padded to the longest (122)
    for i in (2, 4, 10):  # the shortest, a middle one, the longest
        alone = encoder.embed([ids[i]])[0]
        assert torch.allclose(alone, batch[i], atol=1e-5), (i, (alone - batch[i]).abs().max())


def test_small_batches_and_one_batch_agree(encoder):
    ids = [e.token_ids for e in encoder.tokenize(SENTENCES)]
    one = encoder.embed(ids)
    encoder.max_batch_tokens, saved = 40, encoder.max_batch_tokens
    try:
        split = encoder.embed(ids)
    finally:
        encoder.max_batch_tokens = saved
    assert torch.allclose(one, split, atol=1e-5)


def test_batches_group_similar_lengths_with_little_padding(encoder, monkeypatch):
    ids = [e.token_ids for e in encoder.tokenize(SENTENCES)]
    seen: list[list[int]] = []
    real = encoder._embed_batch

    def spy(batch: list[list[int]]) -> torch.Tensor:
        seen.append([len(x) for x in batch])
        return real(batch)

    monkeypatch.setattr(encoder, "_embed_batch", spy)
    encoder.embed(ids)
    assert sorted(n for lens in seen for n in lens) == sorted(len(x) for x in ids)
    assert len(seen) < len(ids)  # short sentences went together
    for lens in seen:
        assert len(lens) == 1 or len(lens) * max(lens) <= 1.25 * sum(lens), lens


def test_tokenize_adds_cls_sep_and_refuses_or_truncates_long_text(encoder):
    ids = encoder.tokenize(["hello world"])[0].token_ids
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) == 4
    long = "word " * 300
    with pytest.raises(PromptTooLongError) as e:
        encoder.tokenize([long])
    assert e.value.count == 302 and e.value.limit == 256
    cut = encoder.tokenize([long], truncate_to=10)[0]
    assert cut.truncated and len(cut.token_ids) == 10 and cut.token_ids[-1] == 102
    # over the model's own limit, truncation stops at max_seq_length
    assert len(encoder.tokenize([long], truncate_to=10_000)[0].token_ids) == 256


def test_different_sentences_are_less_similar_than_paraphrases(encoder):
    texts = ["A man is eating food.", "A man is eating a piece of bread.",
             "The stock market fell sharply today."]
    e = encoder.embed([t.token_ids for t in encoder.tokenize(texts)])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
