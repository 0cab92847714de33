"""Rejection sampling reproduces the target distribution, and greedy acceptance is exact."""

from __future__ import annotations

import torch

from peregrine.sampling.rejection import rejection_sample


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_first_token_is_distributed_as_the_target():
    torch.manual_seed(0)
    v, k, n = 8, 2, 20000
    p = torch.softmax(torch.randn(k + 1, v) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, v) * 1.5, dim=-1)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True) for j in range(k)], 1)
    out = rejection_sample(p.expand(n, k + 1, v), drafts, torch.full((n,), k), q.expand(n, k, v),
                           torch.zeros(n, dtype=torch.bool), [None] * n,
                           torch.Generator().manual_seed(1))
    first = torch.tensor([t[0] for t in out.tokens])
    counts = torch.bincount(first, minlength=v).float()
    # 7 degrees of freedom: the 99.9% critical value is 24.3.
    assert chi_square(counts, p[0]) < 24.3
    # Acceptance rate of the first draft equals sum_x min(p, q).
    rate = sum(a > 0 for a in out.num_accepted) / n
    assert abs(rate - float(torch.minimum(p[0], q[0]).sum())) < 0.02


def test_deterministic_drafts_keep_the_target_distribution():
    torch.manual_seed(2)
    v, n = 6, 20000
    p = torch.softmax(torch.randn(2, v), dim=-1)
    drafts = torch.full((n, 1), 3)  # an n-gram proposer always proposes token 3
    out = rejection_sample(p.expand(n, 2, v), drafts, torch.ones(n, dtype=torch.long), None,
                           torch.zeros(n, dtype=torch.bool), [None] * n,
                           torch.Generator().manual_seed(3))
    counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=v).float()
    assert chi_square(counts, p[0]) < 20.5  # 5 dof, 99.9%


def test_greedy_accepts_exactly_the_argmax_prefix():
    p = torch.zeros(1, 4, 10)
    for j, tok in enumerate([5, 2, 7, 1]):
        p[0, j, tok] = 1.0
    out = rejection_sample(p, torch.tensor([[5, 2, 9]]), torch.tensor([3]), None,
                           torch.tensor([True]), [None])
    assert out.tokens == [[5, 2, 7]] and out.num_accepted == [2]
    out = rejection_sample(p, torch.tensor([[5, 2, 7]]), torch.tensor([3]), None,
                           torch.tensor([True]), [None])
    assert out.tokens == [[5, 2, 7, 1]] and out.num_accepted == [3]


def test_rows_with_fewer_drafts_and_none():
    p = torch.softmax(torch.randn(2, 3, 5), dim=-1)
    out = rejection_sample(p, torch.tensor([[1, -1], [-1, -1]]), torch.tensor([1, 0]), None,
                           torch.tensor([True, True]), [None, None])
    assert len(out.tokens[1]) == 1 and out.tokens[1][0] == int(p[1, 0].argmax())
    assert out.num_accepted[1] == 0 and len(out.tokens[0]) in (1, 2)
