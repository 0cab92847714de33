"""Speculative decoding counters: how many drafts were proposed, and how many accepted."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    """Totals since the engine started, over every verification of a sequence's drafts."""

    num_verifications: int = 0  # (sequence, step) pairs that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    proposed_per_position: list[int] = field(default_factory=list)  # drafts at position j
    accepted_per_position: list[int] = field(default_factory=list)  # of which accepted

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's step: num_drafts proposed, the first num_accepted accepted."""
        if num_drafts == 0:
            return
        self.num_verifications += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        grow = num_drafts - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for j in range(num_drafts):
            self.proposed_per_position[j] += 1
            self.accepted_per_position[j] += j < num_accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying sequence gains per step: accepted drafts + the one sampled."""
        if not self.num_verifications:
            return 0.0
        return 1 + self.num_accepted_tokens / self.num_verifications

    @property
    def per_position_acceptance(self) -> list[float]:
        """For each draft position j: accepted / proposed at j (given all before it held)."""
        return [a / p if p else 0.0
                for a, p in zip(self.accepted_per_position, self.proposed_per_position)]
