"""Hugging Face transformers `generate` as a throughput peer (the usual baseline).

What it can do, and how we run it: static batches of `batch_size` requests in workload
order, prompts left-padded to the longest in the batch, greedy, every sequence run to the
batch's longest output (`min_new_tokens = max_new_tokens`, so EOS never ends one early).
Tokens beyond a request's own output length are computed and thrown away: that waste is
what static batching costs, and it counts against throughput (only the requested tokens
are counted as output) but not against MFU/MBU (the model did run them)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from peregrine.bench.datasets import BenchRequest
from peregrine.bench.phases import PhaseAccounting, StepWork
from peregrine.bench.results import throughput_run
from peregrine.bench.roofline import DevicePeak, ModelCost, state_dict_bytes
from peregrine.models.config import ModelConfig
from peregrine.models.registry import resolve_model


def load_hf_model(model: str | None, load_format: str = "auto",
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """transformers' model for a peregrine `--model` value: the same GGUF (dequantized by
    transformers), the same HF directory, or random weights from the same config.json."""
    import transformers
    transformers.logging.set_verbosity_error()
    source = resolve_model(model, load_format)
    if source.path.endswith(".gguf"):
        if source.format == "dummy":
            raise ValueError("the transformers peer cannot run a GGUF with dummy weights; "
                             "give --load-format auto")
        folder, name = os.path.split(source.path)
        net = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                dtype=dtype)
    elif source.format == "hf":
        net = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    else:
        torch.manual_seed(seed)
        cfg = transformers.AutoConfig.from_pretrained(source.path)
        net = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return net.eval()


class StepClock:
    """A logits processor that changes nothing and notes when each generation step's
    logits are ready (the first call follows the prefill forward pass)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _generate(net: torch.nn.Module, batch: list[BenchRequest], pad_id: int,
              clock: StepClock | None = None) -> torch.Tensor:
    import transformers
    longest = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, longest - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
        mask[i, longest - r.prompt_len:] = 1
    max_out = max(r.output_len for r in batch)
    processors = transformers.LogitsProcessorList([clock] if clock else [])
    with torch.inference_mode():
        return net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_out,
                            min_new_tokens=max_out, do_sample=False, temperature=None,
                            top_p=None, top_k=None, pad_token_id=pad_id,
                            logits_processor=processors)


def run_transformers(requests: list[BenchRequest], peak: DevicePeak, *, model: str | None,
                     load_format: str = "auto", threads: int | None = None,
                     batch_size: int = 16, dtype: torch.dtype = torch.float32,
                     seed: int = 0, warmup: bool = True) -> dict[str, Any]:
    """Run the workload through transformers in static batches; one throughput run."""
    if batch_size < 1:
        raise ValueError(f"hf_batch_size must be >= 1, got {batch_size}")
    if threads:
        torch.set_num_threads(threads)
    net = load_hf_model(model, load_format, dtype, seed)
    cfg = ModelConfig.from_hf(net.config.to_dict())
    kv_bytes = torch.empty((), dtype=dtype).element_size()
    cost = ModelCost.from_config(cfg, state_dict_bytes(net) / cfg.num_params(), kv_bytes)
    eos = net.generation_config.eos_token_id
    pad = net.generation_config.pad_token_id
    pad_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
    if warmup:
        _generate(net, [BenchRequest(16, 4, prompt_token_ids=[1] * 16)] * 2, pad_id)
    phases = PhaseAccounting(cost.weight_bytes)
    generated = 0
    t0 = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        clock = StepClock()
        start = time.perf_counter()
        _generate(net, batch, pad_id, clock)
        end = time.perf_counter()
        marks = [start, *clock.times]
        marks[-1] = end  # generate's bookkeeping after the last step belongs to that step
        for k in range(len(clock.times)):
            work = StepWork()
            for r in batch:
                if k == 0:
                    work.add_prefill(cost, 0, r.prompt_len)
                else:
                    work.add_decode(cost, r.prompt_len + k - 1)
            phases.add(marks[k + 1] - marks[k], work)
        generated += len(batch) * len(clock.times)
    wall = time.perf_counter() - t0
    settings = {"batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "attn_implementation": getattr(net.config, "_attn_implementation", None),
                "padding": "left", "decoding": "greedy, min_new_tokens = max_new_tokens"}
    return throughput_run(
        engine="transformers", label=f"transformers (static batches of {batch_size})",
        settings=settings, requests=requests,
        output_tokens=sum(r.output_len for r in requests), wall_s=wall, phases=phases,
        peak=peak, cost=cost, generated_tokens=generated)
