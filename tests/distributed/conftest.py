"""Helpers of the parallelism tests: ranks as threads of this process (real gloo groups, no
spawn) for the layers, and a deadline for engine calls that must fail rather than hang."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from peregrine.distributed.groups import RankGroups, create_groups
from peregrine.distributed.layout import ParallelLayout


def run_ranks(tp: int, pp: int, fn: Callable[[ParallelLayout, RankGroups], Any],
              timeout: float = 120.0) -> list[Any]:
    """fn(layout, groups) on every rank of tp x pp, each a thread with its own gloo groups;
    the results in rank order (an exception in any rank is raised here)."""
    world = tp * pp
    master = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            store = master if r == 0 else dist.TCPStore("127.0.0.1", master.port, world,
                                                         is_master=False)
            layout = ParallelLayout(tp, pp, r)
            groups = create_groups(layout, store, torch.device("cpu"), timeout)
            results[r] = fn(layout, groups)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"a rank was still running after {timeout} s"
    if errors:
        raise errors[0]
    return results


def within(seconds: float, fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """(result, exception) of fn() run in a thread; fails the test if it takes longer than
    `seconds` (a hang) instead of blocking the suite."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds} s: the driver hangs")
    return box.get("result"), box.get("error")


def greedy_tokens(llm, prompts: list, max_tokens: int = 32) -> list[list[int]]:
    """Each prompt's greedy output token ids."""
    from peregrine import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
