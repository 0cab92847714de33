"""The weighted fair arbiter of several engines' steps: one step at a time, compute in
proportion to shares, a quiet engine never waits behind more than the step in progress,
and idleness earns no credit."""

from __future__ import annotations

import threading
import time

import pytest

from peregrine.engine.fair_share import FairArbiter


def saturate(arbiter: FairArbiter, name: str, step_s: float, stop: threading.Event,
             overlap: list[int], running: list[int]) -> None:
    while not stop.is_set():
        with arbiter.turn(name):
            running.append(1)
            overlap.append(len(running))
            time.sleep(step_s)
            running.pop()


def run_saturated(arbiter: FairArbiter, names: list[str], seconds: float,
                  delays: dict[str, float] | None = None) -> list[int]:
    stop, overlap, running = threading.Event(), [], []
    delays = delays or {}

    def worker(name: str) -> None:
        time.sleep(delays.get(name, 0.0))
        saturate(arbiter, name, 0.004, stop, overlap, running)
    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return overlap


def test_compute_follows_the_shares_one_step_at_a_time():
    arbiter = FairArbiter({"big": 3.0, "small": 1.0})
    overlap = run_saturated(arbiter, ["big", "small"], 1.0)
    assert max(overlap) == 1  # never two steps at once
    ratio = arbiter.busy_seconds["big"] / arbiter.busy_seconds["small"]
    assert 2.2 < ratio < 4.0, arbiter.busy_seconds


def test_a_late_comer_gets_no_credit_for_its_idle_time():
    arbiter = FairArbiter({"a": 1.0, "b": 1.0})
    run_saturated(arbiter, ["a", "b"], 1.2, delays={"b": 0.6})
    # b ran only in the last half, and then shared it equally: about a quarter of the steps
    share = arbiter.busy_seconds["b"] / sum(arbiter.busy_seconds.values())
    assert 0.15 < share < 0.35, arbiter.busy_seconds


def test_a_quiet_engine_waits_for_at_most_the_step_in_progress():
    arbiter = FairArbiter({"busy": 1.0, "quiet": 1.0})
    stop, overlap, running = threading.Event(), [], []
    busy = threading.Thread(target=saturate,
                            args=(arbiter, "busy", 0.05, stop, overlap, running))
    busy.start()
    waits = []
    for _ in range(5):
        time.sleep(0.08)
        began = time.perf_counter()
        with arbiter.turn("quiet"):
            waits.append(time.perf_counter() - began)
    stop.set()
    busy.join()
    assert max(waits) < 0.05 + 0.1, waits  # one busy step, plus scheduling slack


def test_shares_must_be_positive():
    with pytest.raises(ValueError):
        FairArbiter({"a": 0.0})
