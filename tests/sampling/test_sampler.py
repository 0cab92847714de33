"""The sampler draws from exactly the distribution its controls define, greedy rows take the
argmax, seeded rows ignore their neighbours, and logprobs are those of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from peregrine.sampling.sampler import (CDF_BLOCK, PenaltyTensors, Sampler, SamplingTensors,
                                      apply_penalties_, head_keep, inverse_cdf,
                                      sample_filtered)

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -1.7, -2.5])
V = len(LOGITS)
DRAWS = 40_000


def tensors(B: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
            min_p: float = 0.0, greedy: bool = False, seed: int = 1234) -> SamplingTensors:
    """Sampling tensors with the same controls on every one of B rows."""
    k = top_k if top_k > 0 else V
    return SamplingTensors(
        temperature=torch.full((B,), 1.0 if greedy else temperature),
        greedy=torch.full((B,), greedy), all_greedy=greedy,
        uniforms=torch.rand(B, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64),
        top_k=torch.full((B,), k) if k < V else None, top_k_max=k if k < V else None,
        top_p=torch.full((B,), top_p) if top_p < 1 else None,
        min_p=torch.full((B,), min_p) if min_p > 0 else None)


def reference(temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
              min_p: float = 0.0) -> list[float]:
    """The distribution the controls define, written out token by token."""
    probs = torch.softmax(LOGITS / temperature, dim=0).tolist()
    keep = set(range(V))
    if min_p > 0:
        keep = {i for i in keep if probs[i] >= min_p * max(probs)}
    order = sorted(keep, key=lambda i: -probs[i])
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1:
        total = sum(probs[i] for i in order)
        kept, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            kept.append(i)
            mass += probs[i] / total
        order = kept
    total = sum(probs[i] for i in order)
    return [probs[i] / total if i in order else 0.0 for i in range(V)]


def chi_square_critical(df: int, z: float = 5.0) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at a normal z (z=5: p~3e-7),
    a generous bound: a correct sampler fails it about once in millions of runs."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(tokens: torch.Tensor, expected: list[float]) -> None:
    counts = torch.bincount(tokens, minlength=V).tolist()
    support = [i for i in range(V) if expected[i] > 0]
    for i in range(V):
        if expected[i] == 0:
            assert counts[i] == 0, f"token {i} is filtered out but was drawn {counts[i]} times"
    if len(support) == 1:
        assert counts[support[0]] == len(tokens)
        return
    stat = sum((counts[i] - len(tokens) * expected[i]) ** 2 / (len(tokens) * expected[i])
               for i in support)
    assert stat < chi_square_critical(len(support) - 1), (counts, expected, stat)


CASES = {
    "temperature-1": dict(),
    "temperature-0.5": dict(temperature=0.5),
    "temperature-2": dict(temperature=2.0),
    "top-k-3": dict(top_k=3),
    "top-p-0.7": dict(top_p=0.7),
    "top-p-0.05-keeps-best": dict(top_p=0.05),
    "min-p-0.2": dict(min_p=0.2),
    "top-k-and-top-p": dict(top_k=5, top_p=0.8, temperature=0.7),
    "all-filters": dict(top_k=6, top_p=0.9, min_p=0.1, temperature=1.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_draws_follow_the_reference_distribution(case):
    controls = CASES[case]
    out = Sampler()(LOGITS.expand(DRAWS, V).clone(), tensors(DRAWS, **controls))
    assert_matches(torch.tensor(out.token_ids), reference(**controls))


def test_chi_square_check_rejects_a_wrong_distribution():
    """The statistical check has teeth: temperature 1 draws fail against temperature 0.8."""
    out = Sampler()(LOGITS.expand(DRAWS, V).clone(), tensors(DRAWS))
    with pytest.raises(AssertionError):
        assert_matches(torch.tensor(out.token_ids), reference(temperature=0.8))


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    st = tensors(6, temperature=1.0, top_p=0.9)
    st.greedy = torch.tensor([True, False, True, False, False, True])
    tokens = torch.tensor(Sampler()(logits, st).token_ids)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(tokens[st.greedy], argmax[st.greedy])


def random_controls(B: int, V: int, seed: int) -> SamplingTensors:
    """Rows with every mix of filters (and some with none) and peaked or flat logits."""
    g = torch.Generator().manual_seed(seed)
    top_k = torch.where(torch.rand(B, generator=g) < 0.4,
                        torch.randint(1, 13, (B,), generator=g), torch.tensor(V))
    top_p = torch.where(torch.rand(B, generator=g) < 0.6,
                        torch.rand(B, generator=g) * 0.99 + 0.01, torch.tensor(1.0))
    min_p = torch.where(torch.rand(B, generator=g) < 0.3, torch.rand(B, generator=g) * 0.2,
                        torch.tensor(0.0))
    plain = (top_k == V) & (top_p == 1)
    return SamplingTensors(
        temperature=torch.ones(B), greedy=torch.zeros(B, dtype=torch.bool), all_greedy=False,
        uniforms=torch.rand(B, generator=g, dtype=torch.float64),
        top_k=top_k, top_k_max=int(top_k[top_k < V].max()), top_p=top_p, min_p=min_p,
        plain=plain if plain.any() else None)


def test_head_of_the_distribution_gives_the_same_draws_as_a_full_sort():
    """top-p over the 16 most likely tokens (looking again at 128, then at whole sorted rows,
    for rows whose nucleus is larger) draws exactly the tokens a full sort draws, for the
    same uniforms."""
    B, V = 64, 2000
    nucleus_sizes = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        scale = torch.rand(B, 1, generator=g) * 6  # from flat (0) to peaked (6)
        probs = torch.softmax(torch.randn(B, V, generator=g) * scale, dim=-1)
        st = random_controls(B, V, seed)
        if seed % 2:  # top-p (and min-p) without any top-k
            st.top_k = st.top_k_max = None
            st.plain = (st.top_p == 1) if (st.top_p == 1).any() else None
        head = sample_filtered(probs, st, head_size=16)
        full = sample_filtered(probs, st, head_size=V)
        assert torch.equal(head, full)
        vals = probs.sort(dim=-1, descending=True).values
        kept = head_keep(vals, st.top_k, st.top_p, st.min_p)
        nucleus_sizes += kept.sum(dim=-1)[st.top_p < 1].tolist()
    # Every path ran: nuclei within the first head, the second, and only the whole row.
    assert min(nucleus_sizes) < 16 < max(nucleus_sizes)
    assert any(16 < n <= 128 for n in nucleus_sizes) and max(nucleus_sizes) > 128


def test_each_row_is_sampled_on_its_own():
    """A row's token depends on its logits, controls and uniform only, not its neighbours."""
    B, V = 24, 500
    g = torch.Generator().manual_seed(9)
    probs = torch.softmax(torch.randn(B, V, generator=g) * 2, dim=-1)
    st = random_controls(B, V, 9)
    together = sample_filtered(probs, st, head_size=32)
    for i in range(B):
        row = torch.tensor([i])
        assert sample_filtered(probs[row], st.select(row), head_size=32).item() == together[i]


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    st = tensors(3, temperature=0.5, top_k=4)
    st.penalties = PenaltyTensors(output_index=torch.tensor([0 * 40 + 7, 2 * 40 + 1]),
                                  frequency=torch.full((3,), 1.5))
    st.logprob_rows = torch.tensor([0, 2])
    st.num_logprobs = [3, 0]
    out = Sampler()(logits, st)
    lp = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        tl = out.logprobs[row]
        tok = out.token_ids[row]
        assert tl.token_id == tok
        assert tl.logprob == pytest.approx(lp[row, tok].item(), abs=1e-6)
        assert tl.rank == int((lp[row] >= lp[row, tok]).sum())
    top = out.logprobs[0]
    assert top.top_ids == lp[0].topk(3).indices.tolist()
    assert top.top_logprobs == pytest.approx(lp[0].topk(3).values.tolist(), abs=1e-6)
    assert out.logprobs[2].top_ids == []


def test_penalties_math_on_a_hand_worked_row():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    pt = PenaltyTensors(
        output_index=torch.tensor([0, 0, 1]),  # token 0 twice, token 1 once in the output
        repetition=torch.tensor([2.0]), prompt_index=torch.tensor([3]),  # token 3 in prompt
        frequency=torch.tensor([0.5]), presence=torch.tensor([0.25]))
    out = logits.clone()
    apply_penalties_(out, pt)
    # token 0: 2/2 - 0.5*2 - 0.25 ; token 1: -1*2 - 0.5 - 0.25 ; token 3: 3/2 ; others as is
    assert out.tolist() == [[-0.25, -2.75, 0.5, 1.5, -2.0]]


def test_two_level_inverse_cdf_draws_what_one_running_sum_draws():
    """Blocks first, then a token inside the block: the same token as one float64 running
    sum over the row, and never a token of zero weight (even at u = 0 or u -> 1)."""
    B, V = 200, CDF_BLOCK * 40
    g = torch.Generator().manual_seed(11)
    weights = torch.rand(B, V, generator=g) ** 8
    weights[torch.rand(B, V, generator=g) < 0.7] = 0  # sparse rows
    weights[:50, : V // 2] = 0  # whole zero blocks in front...
    weights[50:100, V // 2:] = 0  # ...and at the end
    u = torch.rand(B, generator=g, dtype=torch.float64)
    u[:5], u[5:10] = 0.0, 1 - 2 ** -53
    got = inverse_cdf(weights, u)
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    want = torch.searchsorted(cdf, (u.unsqueeze(1) * cdf[:, -1:]), right=True).squeeze(1)
    assert bool((weights.gather(1, got.unsqueeze(1)) > 0).all())
    assert (got == want.clamp(max=V - 1)).float().mean() == 1.0
