"""Tokenizer: encode/decode, special tokens, EOS ids and chat templates (jinja2).

Backed by the `tokenizers` library. From a Hugging Face directory it reads
tokenizer.json + tokenizer_config.json (+ chat_template.jinja); from a GGUF file it builds
the byte-level BPE (`gpt2`) from the vocabulary, merges and pre-tokenizer named in the
metadata, or the SentencePiece BPE (`llama`: Llama 2, Phi-3, Gemma) from the vocabulary and
its scores."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from peregrine.models.errors import ModelLoadError, PromptTooLongError

# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` names (byte-level BPE).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                   r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                  r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        # Each digit is its own pre-token, then GPT-2's byte-level split.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN,
               "qwen2": _QWEN2_PATTERN}.get(pre)
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    """GPT-2-style BPE over bytes, with the file's merges and pre-tokenizer."""
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
    backend.decoder = decoders.ByteLevel()
    return backend


_SPACE = "\u2581"  # SentencePiece's visible space
_NORMAL, _UNKNOWN, _BYTE = 1, 2, 6  # tokenizer.ggml.token_type values


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]
                       ) -> HFTokenizer:
    """SentencePiece BPE (Llama 2, Phi-3, Gemma): spaces become U+2581, pieces merge best
    score first, characters outside the vocabulary fall back to <0xXX> byte tokens.

    The files carry scores, not merges: every split of a token into two tokens is a merge
    ranked by that token's score, as transformers rebuilds it. Gemma's scores do not follow
    its merge order but its token order does, and Gemma files store runs of spaces as real
    spaces where the text side has U+2581 (transformers' GGUF loader does the same)."""
    gemma = str(meta.get("general.architecture", "")).startswith("gemma")
    if gemma:
        tokens = [_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    else:
        scores = [float(x) for x in meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, int, str, str]] = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next((tokens[i] for i, t in enumerate(types) if t == _UNKNOWN), None)
    backend = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk,
                                     fuse_unk=True, byte_fallback=_BYTE in types))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    steps = [normalizers.Prepend(_SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    undo = [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), *undo])
    return backend


def _token_text(tok: AddedToken | str | dict | None) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(self, backend: HFTokenizer, *, bos_token_id: int | None,
                 eos_token_ids: list[int], chat_template: str | None,
                 add_bos_token: bool, name: str = "") -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items()
                             if t.special}
        self._template: jinja2.Template | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], name: str = "") -> "Tokenizer":
        """Build from a GGUF file's `tokenizer.ggml.*` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (peregrine "
                                 "builds byte-level BPE, `gpt2`, and SentencePiece BPE, "
                                 "`llama`); pass --tokenizer with a Hugging Face tokenizer "
                                 "directory")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        backend = (_byte_level_bpe(meta, tokens) if kind == "gpt2"
                   else _sentencepiece_bpe(meta, tokens, types))
        # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
        added = [AddedToken(tokens[i], special=(t == 3), normalized=False)
                 for i, t in enumerate(types) if t in (3, 4)]
        backend.add_tokens(added)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [] if eos is None else [int(eos)]
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos_ids.append(int(eot))
        return cls(backend, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                   chat_template=meta.get("tokenizer.chat_template"),
                   # llama.cpp adds BOS for SentencePiece vocabularies unless told not to
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                   name=name)

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """Build from a Hugging Face directory (tokenizer.json, tokenizer_config.json, ...)."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ModelLoadError(f"{path} has no tokenizer.json")
        backend = HFTokenizer.from_file(tok_file)
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gcfg = _read_json(os.path.join(path, "generation_config.json"))
        mcfg = _read_json(os.path.join(path, "config.json"))
        template = tcfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            template[0]["template"] if template else None)

        def token_id(key: str) -> int | None:
            text = _token_text(tcfg.get(key))
            return backend.token_to_id(text) if text else None

        eos_ids: list[int] = []
        for src in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id"), token_id("eos_token")):
            if src is not None:
                eos_ids.extend([src] if isinstance(src, int) else src)
        bos = token_id("bos_token")
        if bos is None:
            bos = mcfg.get("bos_token_id")
        # A post-processor in tokenizer.json adds BOS itself when it should.
        return cls(backend, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template,
                   add_bos_token=False, name=os.path.basename(path.rstrip("/")))

    # --- encode / decode ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS where the model wants it."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ids outside the vocabulary, as random weights produce, are dropped)."""
        n = self.vocab_size
        ids = [i for i in ids if 0 <= i < n]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True
                      ) -> list[int]:
        """encode(text), or PromptTooLongError as soon as it is sure to exceed `limit` tokens:
        a text longer than 8 bytes per allowed token (twice English's) is first counted in
        pieces cut at spaces, and counting stops once they pass the limit, so a huge text
        costs about `limit` tokens of work, not its whole length."""
        if len(text) > _PIECE_CHARS and len(text.encode("utf-8", "surrogatepass")) > 8 * limit:
            counted, boundaries, start = 0, 0, 0
            while start < len(text):
                end = _piece_end(text, start)
                counted += len(self.backend.encode(text[start:end],
                                                   add_special_tokens=False).ids)
                # a cut can split what would merge (or add a prefix token): allow for it
                if counted - _CUT_SLACK * boundaries > limit:
                    raise PromptTooLongError(counted - _CUT_SLACK * boundaries, limit,
                                             exact=False)
                start, boundaries = end, boundaries + 1
        ids = self.encode(text, add_special_tokens)
        if len(ids) > limit:
            raise PromptTooLongError(len(ids), limit)
        return ids

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (its raw byte-level form)."""
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for control tokens such as <|im_end|>."""
        return token_id in self._special_ids

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (for logprobs)."""
        return self.decode([token_id])

    # --- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render OpenAI-style messages with the model's chat template."""
        if not self.chat_template:
            raise ValueError(f"model {self.name!r} has no chat template; use a raw completion")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos, **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat (the template places any BOS itself)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


_PIECE_CHARS = 16384  # the size of the pieces a long text is counted in
_CUT_SLACK = 8  # tokens one cut may add beyond the whole text's tokenization


def _piece_end(text: str, start: int) -> int:
    """The end of the piece from `start`: about _PIECE_CHARS on, before a space if one is
    near (tokenizers split there anyway)."""
    end = start + _PIECE_CHARS
    if end >= len(text):
        return len(text)
    space = text.rfind(" ", end - 1024, end)
    return space if space > start else end


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
