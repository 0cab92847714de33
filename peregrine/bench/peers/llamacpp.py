"""llama.cpp through llama-cpp-python (engine name `llama.cpp-python`) as a throughput peer
on the same GGUF file: the fallback for workloads llama.cpp's own binaries cannot run (a
random workload of mixed lengths; see `llamacpp_bin.py` and `workloads.py` for those).

What it can do, and how we run it: the high-level `Llama` class holds one sequence, so
requests run one after another: the prompt is evaluated in chunks of `n_batch` tokens,
then one token per forward pass. llama.cpp computes on the GGUF's quantized blocks
directly (Q4_1 here: about 0.6 bytes per weight), while peregrine and transformers
dequantize to float32 at load (4 bytes per weight): per decoded token llama.cpp reads
about 6x fewer weight bytes. llama.cpp itself can batch several sequences (its C batch API
and its own `llama-server` with parallel slots); llama-cpp-python's high-level class and
its OpenAI server do not use that, and neither do we here: `llamacpp_bin.py` runs
llama.cpp's own llama-batched-bench and llama-server, which do."""

from __future__ import annotations

import time
from typing import Any

from peregrine.bench.datasets import BenchRequest
from peregrine.bench.phases import PhaseAccounting, StepWork
from peregrine.bench.results import throughput_run
from peregrine.bench.roofline import DevicePeak, ModelCost
from peregrine.models.gguf_file import GGUFFile
from peregrine.models.loader import gguf_config
from peregrine.models.registry import resolve_model

KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16


def gguf_cost(path: str) -> ModelCost:
    """The cost model of a GGUF run as stored (bytes per weight from the file's tensors)."""
    f = GGUFFile(path)
    cfg = gguf_config(f, "")
    stored = sum(t.data.nbytes for t in f.tensors.values())
    values = sum(_numel(t.shape) for t in f.tensors.values())
    return ModelCost.from_config(cfg, stored / values, KV_BYTES_PER_VALUE)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run_llamacpp(requests: list[BenchRequest], peak: DevicePeak, *, model: str | None,
                 threads: int, n_batch: int = 512, warmup: bool = True) -> dict[str, Any]:
    """Run the workload through llama-cpp-python's `Llama`, one request at a time, greedy,
    exactly `output_len` tokens each (EOS does not stop `Llama.generate`)."""
    import llama_cpp
    source = resolve_model(model)
    if source.format != "gguf":
        raise ValueError("the llama.cpp peer needs a GGUF model with real weights")
    n_ctx = max(r.prompt_len + r.output_len for r in requests) + 16
    llm = llama_cpp.Llama(model_path=source.path, n_ctx=n_ctx, n_batch=n_batch,
                          n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    cost = gguf_cost(source.path)
    if warmup:
        _generate(llm, BenchRequest(16, 4, prompt_token_ids=[1] * 16))
    phases = PhaseAccounting(cost.weight_bytes)
    t0 = time.perf_counter()
    for req in requests:
        marks = _generate(llm, req)
        for k in range(req.output_len):
            work = StepWork()
            if k == 0:
                work.add_prefill(cost, 0, req.prompt_len)
            else:
                work.add_decode(cost, req.prompt_len + k - 1)
            phases.add(marks[k + 1] - marks[k], work)
    wall = time.perf_counter() - t0
    settings = {"threads": threads, "n_batch": n_batch, "n_ctx": n_ctx,
                "weights": "GGUF as stored", "kv_cache": "f16",
                "sequences_at_once": 1,
                "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(
                    errors="replace").strip()}
    return throughput_run(
        engine="llama.cpp-python", label="llama.cpp (llama-cpp-python, one sequence at a time)",
        settings=settings, requests=requests,
        output_tokens=sum(r.output_len for r in requests), wall_s=wall, phases=phases,
        peak=peak, cost=cost)


def _generate(llm: Any, req: BenchRequest) -> list[float]:
    """Generate req.output_len tokens greedily from a fresh context; the clock before the
    prompt and after each token (the first mark after the prompt's evaluation)."""
    llm.reset()
    marks = [time.perf_counter()]
    for _ in llm.generate(req.prompt_token_ids, temp=0.0, top_k=1, reset=False):
        marks.append(time.perf_counter())
        if len(marks) > req.output_len:
            break
    return marks
