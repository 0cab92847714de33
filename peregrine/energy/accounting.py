"""Energy and cost of each request: every engine step's meter delta and wall time, split
among the step's requests by their share of the step's tokens.

Tokens are the fair unit of a step's work: a prefill chunk of 200 tokens costs the forward
pass about 200 times what one decode token does in compute, and the step's power is drawn
for the batch as a whole. Cost is charged by wall time, not by joules, because a rented or
amortised device costs its hourly price whether it draws 50 W or 700 W: a request pays
`step seconds x price_per_hour / 3600` times its token share of each step it was in. Time
between steps (no request running) is charged to no one; the break-even analysis
(`peregrine estimate --compare-api`, docs/cost.md) is where idle time is priced."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from peregrine.energy.meters import PowerMeter

JOULES_PER_KWH = 3.6e6


def split(total: float, weights: Sequence[int]) -> list[float]:
    """`total` split in proportion to `weights` (all zero: evenly); the parts sum to it."""
    if not weights:
        return []
    s = sum(weights)
    if s <= 0:
        return [total / len(weights)] * len(weights)
    return [total * w / s for w in weights]


@dataclass
class StepEnergy:
    """What one step consumed: joules from the meter, wall seconds, dollars."""

    joules: float
    seconds: float
    cost_usd: float


class EnergyAccountant:
    """Reads the meter around each step and keeps the engine's running totals."""

    def __init__(self, meter: PowerMeter, price_per_hour: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if price_per_hour < 0:
            raise ValueError(f"price_per_hour must be >= 0, got {price_per_hour}")
        self.meter = meter
        self.price_per_hour = price_per_hour
        self._clock = clock
        self._mark: tuple[float, float] | None = None
        self.joules_total = 0.0
        self.cost_usd_total = 0.0
        self.seconds_total = 0.0
        self.tokens_total = 0

    @property
    def source(self) -> str:
        """nvml | rapl | model."""
        return self.meter.source

    @property
    def prices_cost(self) -> bool:
        """Whether a device-hour price was given (cost is reported only then)."""
        return self.price_per_hour > 0

    def start_step(self) -> None:
        """Remember the meter and the clock as a step begins."""
        self._mark = (self.meter.joules(), self._clock())

    def end_step(self, tokens: Sequence[int]) -> list[StepEnergy]:
        """Close the step begun by start_step: its energy, time and cost split by `tokens`
        (one entry per request of the step). Without a start, nothing is charged."""
        if self._mark is None:
            return [StepEnergy(0.0, 0.0, 0.0) for _ in tokens]
        j0, t0 = self._mark
        self._mark = None
        joules = max(self.meter.joules() - j0, 0.0)
        seconds = max(self._clock() - t0, 0.0)
        cost = seconds * self.price_per_hour / 3600
        self.joules_total += joules
        self.seconds_total += seconds
        self.cost_usd_total += cost
        self.tokens_total += sum(tokens)
        return [StepEnergy(j, s, c) for j, s, c in
                zip(split(joules, tokens), split(seconds, tokens), split(cost, tokens))]

    @property
    def tokens_per_kwh(self) -> float:
        """Tokens computed per kWh since the engine started (0 before any energy)."""
        return self.tokens_total / (self.joules_total / JOULES_PER_KWH) \
            if self.joules_total > 0 else 0.0

    @property
    def tokens_per_usd(self) -> float:
        """Tokens computed per dollar of device time since the engine started (0 unpriced)."""
        return self.tokens_total / self.cost_usd_total if self.cost_usd_total > 0 else 0.0
