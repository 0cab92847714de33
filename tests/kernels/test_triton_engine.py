"""Through the whole engine, the Triton backend gives the torch backend's greedy tokens; the
padded decode batches CUDA graphs replay leave the real rows' results unchanged."""

from __future__ import annotations

import random

import torch

from peregrine import SamplingParams
from peregrine.attention_backend import LayerCache
from peregrine.engine.cuda_graphs import DecodeGraphRunner
from peregrine.kernels.triton.decode_attention import DecodeTiles
from peregrine.kernels.triton.prefill_attention import PrefillTiles
from peregrine.kernels.triton_attention import TritonAttentionBackend
from tests.conftest import make_tiny_llm


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    stem = [rng.randrange(512) for _ in range(20)]  # shared: prefix-cache hits
    return [{"prompt_token_ids": stem + [rng.randrange(512) for _ in range(rng.randrange(1, 25))]}
            for _ in range(n)]


def test_triton_backend_greedy_equals_torch_backend(tiny_model_dir, device):
    """float64 tiny model; a 17-token step budget chunks every prompt, and the shared stem
    of 5 blocks is served from the prefix cache to all but the first prompt."""
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs, hits = {}, {}
    for backend in ("torch", "triton"):
        llm = make_tiny_llm(tiny_model_dir, attention_backend=backend, max_num_batched_tokens=17,
                            device=device.type, enforce_eager=True)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts(4), sp)]
        hits[backend] = llm.engine.get_stats().prefix_cache_hits
        llm.engine.check_invariants()
    assert outs["triton"] == outs["torch"]
    assert hits["triton"] == hits["torch"] > 0


def test_padded_graph_batch_matches_the_eager_batch(tiny_model_dir, device):
    """The exact forward a decode graph captures (static buffers padded from 3 sequences to
    8, launch plan sized for the full context) equals the eager forward of the 3 alone (to
    rounding: the split-K plans differ), and the padded rows write nothing to the KV cache."""
    llm = make_tiny_llm(tiny_model_dir, attention_backend="triton", device=device.type)
    engine = llm.engine
    model = engine.loaded.model
    # Small tiles: the padded launch plan splits the context, leaving empty splits to merge.
    model.set_attention_backend(TritonAttentionBackend(device, DecodeTiles(16, 32),
                                                       PrefillTiles(32, 16)))
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts(3, seed=1)):
        engine.add_request(str(i), p, sp)
    engine.step()  # prefill all three
    batch = engine.scheduler.schedule()
    assert batch.num_decodes == len(batch.seqs) == 3
    inp = engine.runner.prepare(batch)

    def clone(caches: list[LayerCache]) -> list[LayerCache]:
        return [LayerCache(c.k.clone(), c.v.clone()) for c in caches]

    before = clone(engine.kv_caches)
    eager_caches = clone(engine.kv_caches)
    with torch.inference_mode():
        eager = model(inp.input_ids, inp.positions, inp.meta, eager_caches)
        graphs = DecodeGraphRunner(model, clone(engine.kv_caches), max_num_seqs=8,
                                   max_model_len=engine.max_model_len, block_size=4,
                                   device=device)
        graphs.buffers.load(inp.input_ids, inp.positions, inp.meta, size=8)
        padded = graphs.forward(8)
    torch.testing.assert_close(padded[:3], eager, atol=1e-10, rtol=0)
    written = torch.zeros(before[0].k.shape[:2], dtype=torch.bool).view(-1)
    written[inp.meta.slot_mapping] = True
    for a, b, old in zip(graphs.kv_caches, eager_caches, before):
        for x, y, z in ((a.k, b.k, old.k), (a.v, b.v, old.v)):
            x, y, z = x.flatten(0, 1), y.flatten(0, 1), z.flatten(0, 1)
            torch.testing.assert_close(x[written], y[written], atol=1e-10, rtol=0)
            assert torch.equal(x[~written], z[~written])  # the padded rows wrote nothing


def test_gemma2_soft_capped_greedy_equals_torch_backend(tmp_path, device):
    """Gemma 2 (attention soft-capped at 0.5 on sharpened queries, local layers of window 8)
    through the engine: the Triton kernels give the torch backend's greedy tokens, over
    chunked prefills, prefix hits and decodes past the window."""
    from peregrine import LLM
    from tests.conftest import write_hf_checkpoint
    from tests.models.parity import sharpen_attention
    path, ref = write_hf_checkpoint(tmp_path, "gemma2", head_dim=16, query_pre_attn_scalar=16,
                                    sliding_window=8, attn_logit_softcapping=0.5)
    sharpen_attention(ref, path)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reqs = [{"prompt_token_ids": [t % 256 for t in p["prompt_token_ids"]]} for p in prompts(2)]
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, dtype="float64", block_size=4, num_kv_blocks=128,
                  attention_backend=backend, max_num_batched_tokens=17, device=device.type,
                  enforce_eager=True)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(reqs, sp)]
    assert outs["triton"] == outs["torch"]
