"""LLM: the offline API, `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from peregrine.config import EngineConfig
from peregrine.engine.llm_engine import LLMEngine, PromptType
from peregrine.layers.pooling import PoolingType
from peregrine.lora.request import LoRARequest
from peregrine.models.tokenizer import Tokenizer
from peregrine.outputs import RequestOutput
from peregrine.sampling_params import SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """Load a model once, then generate for batches of prompts (raw, or chats)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"unknown LLM arguments {sorted(unknown)}; see EngineConfig")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config)

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 priority: Seq[int] | None = None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; one RequestOutput per prompt, in order.

        A prompt is a string, {"prompt_token_ids": [...]} or {"prompt": "..."}; no chat
        template is applied (use `chat`). `lora_request`: one adapter for every prompt, or
        one per prompt (None: the base model); needs enable_lora=True."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        loras = (list(lora_request) if isinstance(lora_request, (list, tuple))
                 else [lora_request] * len(prompts))
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora requests for {len(prompts)} prompts")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                req = self.engine.add_request(None, prompt, p,
                                              priority=priority[i] if priority else 0,
                                              lora_request=loras[i])
                ids.append(req.request_id)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(self, messages: Messages | Seq[Messages],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
             ) -> list[RequestOutput]:
        """Apply the chat template to each conversation and generate the assistant's turn."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [{"prompt": tok.apply_chat_template(c, add_generation_prompt),
                    "prompt_token_ids": tok.encode_chat(c, add_generation_prompt)} for c in convs]
        return self.generate(prompts, sampling_params, lora_request=lora_request)

    def embed(self, prompts: str | list[int] | Seq[str | list[int]],
              pooling: PoolingType = "last", normalize: bool = True) -> torch.Tensor:
        """Pooled embeddings [N, hidden] of the model's final hidden states: each prompt's
        last token ("last") or the mean of its tokens ("mean"), normalized unless told not."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                         and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        tok = self.engine.tokenizer
        ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self.engine.embed(ids, pooling, normalize)

    # --- driving the loop by hand ---------------------------------------------------------------
    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> str:
        """Queue one request; returns its id."""
        return self.engine.add_request(request_id, prompt, params, priority,
                                       lora_request=lora_request).request_id

    def step(self) -> list[RequestOutput]:
        """One engine step; outputs of the requests it advanced."""
        return self.engine.step()

    def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks."""
        self.engine.abort_request(request_id)

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor/pipeline parallelism; else nothing)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        """`with LLM(...) as llm:` shuts the engine's workers down on the way out."""
        self.shutdown()

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return [final[i] for i in ids]

    @staticmethod
    def _params_list(params: SamplingParams | Seq[SamplingParams] | None,
                     n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return params
