"""Batched penalties, logit_bias and min_tokens change the logits exactly as a plain per-row
loop over the same sequences says; parts nobody uses are not built at all."""

from __future__ import annotations

import random

import pytest
import torch

from peregrine.engine.sequence import Request, Sequence
from peregrine.sampling.metadata import build_sampling_tensors
from peregrine.sampling.sampler import apply_logits_processors
from peregrine.sampling_params import SamplingParams

V = 97
EOS = [3, 96]
CPU = torch.device("cpu")


def make_seq(rng: random.Random, params: SamplingParams, index: int = 0) -> Sequence:
    prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
    req = Request(f"r{rng.random()}", None, prompt, params, eos_token_ids=EOS)
    seq = Sequence(req, index, params)
    seq.token_ids += [rng.randrange(20) for _ in range(rng.randrange(0, 25))]  # repeats likely
    return seq


def loop_reference(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Every rule applied one row, one token at a time (vLLM / OpenAI semantics)."""
    out = logits.clone()
    for r, seq in enumerate(seqs):
        p = seq.params
        row = out[r]
        for tok, bias in (p.logit_bias or {}).items():
            row[tok] += bias
        if seq.num_output_tokens < p.min_tokens:
            for tok in ([] if p.ignore_eos else EOS) + p.stop_token_ids:
                row[tok] = float("-inf")
        output = seq.token_ids[seq.num_prompt_tokens:]
        for tok in set(seq.token_ids):
            if row[tok] > 0:
                row[tok] /= p.repetition_penalty
            else:
                row[tok] *= p.repetition_penalty
        for tok in set(output):
            row[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    return out


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.7, 1.0]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.5, -1.0]),
        presence_penalty=rng.choice([0.0, 0.0, 1.5, -0.5]),
        logit_bias=rng.choice([None, {5: 10.0, 17: -100.0}, {0: 2.5}]),
        min_tokens=rng.choice([0, 0, 10, 30]), max_tokens=40,
        ignore_eos=rng.random() < 0.3, stop_token_ids=rng.choice([[], [7], [7, 8]]))


def test_batched_logits_processors_equal_a_per_row_loop():
    rng = random.Random(0)
    for trial in range(20):
        seqs = [make_seq(rng, random_params(rng)) for _ in range(rng.randrange(1, 9))]
        logits = torch.randn(len(seqs), V, generator=torch.Generator().manual_seed(trial))
        st = build_sampling_tensors(seqs, V, CPU, random.Random(0))
        got = apply_logits_processors(logits, st)
        torch.testing.assert_close(got, loop_reference(logits, seqs), rtol=0, atol=1e-6)


def test_plain_batch_builds_no_optional_tensors():
    rng = random.Random(1)
    seqs = [make_seq(rng, SamplingParams(temperature=t)) for t in (0.0, 0.8, 1.0)]
    st = build_sampling_tensors(seqs, V, CPU, random.Random(0))
    assert st.penalties is None and st.logit_bias is None and st.banned is None
    assert st.top_k is None and st.top_p is None and st.min_p is None
    assert st.logprob_rows is None
    logits = torch.randn(3, V)
    assert apply_logits_processors(logits, st) is logits


def test_only_penalized_rows_contribute_tokens():
    rng = random.Random(2)
    plain = make_seq(rng, SamplingParams())
    penalized = make_seq(rng, SamplingParams(frequency_penalty=1.0))
    st = build_sampling_tensors([plain, penalized], V, CPU, random.Random(0))
    assert st.penalties.repetition is None and st.penalties.presence is None
    assert len(st.penalties.output_index) == penalized.num_output_tokens
    assert bool((st.penalties.output_index >= V).all())  # row 1 only


def test_seeded_samples_draw_from_seed_plus_index_and_greedy_rows_draw_nothing():
    rng = random.Random(3)
    params = SamplingParams(seed=10, n=3)
    seqs = [make_seq(rng, params, index=i) for i in range(3)]
    greedy = make_seq(rng, SamplingParams(temperature=0, seed=5))
    unseeded = make_seq(rng, SamplingParams())
    shared = random.Random(77)
    for step in range(3):
        st = build_sampling_tensors(seqs + [greedy, unseeded], V, CPU, shared)
        want = [random.Random(10 + i) for i in range(3)]
        for _ in range(step):
            [w.random() for w in want]
        assert st.uniforms[:3].tolist() == [w.random() for w in want]
        assert st.uniforms[3] == 0.0
    assert greedy.generator is None
    reference = random.Random(77)
    assert st.uniforms[4].item() == [reference.random() for _ in range(3)][-1]


def test_filter_rows_in_a_mixed_batch():
    rng = random.Random(5)
    seqs = [make_seq(rng, SamplingParams(temperature=0)),
            make_seq(rng, SamplingParams(top_p=0.9)),
            make_seq(rng, SamplingParams(top_k=7)),
            make_seq(rng, SamplingParams(min_p=0.1))]
    st = build_sampling_tensors(seqs, V, CPU, random.Random(0))
    assert st.top_k.tolist() == [1, V, 7, V] and st.top_k_max == 7
    assert st.top_p.tolist() == [1.0, pytest.approx(0.9), 1.0, 1.0]
    assert st.plain.tolist() == [False, False, False, True]
    assert st.min_p.tolist() == [0.0, 0.0, 0.0, pytest.approx(0.1)]


def test_logprob_rows_and_counts():
    rng = random.Random(4)
    seqs = [make_seq(rng, SamplingParams()),
            make_seq(rng, SamplingParams(logprobs=5)),
            make_seq(rng, SamplingParams(logprobs=0)),
            make_seq(rng, SamplingParams(use_beam_search=True, beam_width=3, temperature=0)),
            make_seq(rng, SamplingParams(n=1, best_of=3))]
    st = build_sampling_tensors(seqs, V, CPU, random.Random(0))
    assert st.logprob_rows.tolist() == [1, 2, 3, 4]
    assert st.num_logprobs == [5, 0, 6, 0]
    assert st.greedy.tolist() == [False, False, False, True, False]
