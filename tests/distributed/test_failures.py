"""A rank that fails never hangs the driver: a worker killed, one that raises in the middle
of a step, or one that stops answering makes the driver raise WorkerFailedError naming the
rank and the cause, within seconds (every call here runs under a deadline); the workers are
stopped, and every later step fails at once with the same reason."""

from __future__ import annotations

import os
import signal
import time

import pytest

from peregrine import LLM
from peregrine.distributed.executor import WorkerFailedError
from peregrine.distributed.messages import StepMessage, decode, encode, from_wire, to_wire
from peregrine.engine.llm_engine import StepFailedError
from tests.conftest import tiny_config_dir
from tests.distributed.conftest import greedy_tokens, within

ENGINE = dict(load_format="dummy", num_kv_blocks=64, block_size=4)
PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5, 6]}]


@pytest.fixture
def tiny_path(tmp_path_factory) -> str:
    return tiny_config_dir(tmp_path_factory)


def _worker_failure(error: BaseException | None) -> WorkerFailedError:
    """The WorkerFailedError behind a failed generate (the engine wraps step failures)."""
    assert isinstance(error, StepFailedError), error
    assert isinstance(error.__cause__, WorkerFailedError), error.__cause__
    return error.__cause__


def test_a_killed_worker_fails_the_step_clearly(tiny_path):
    llm = LLM(tiny_path, tensor_parallel_size=2, **ENGINE)
    greedy_tokens(llm, PROMPTS, 2)
    worker = llm.engine.executor.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    _, error = within(30, lambda: greedy_tokens(llm, PROMPTS, 4))
    assert "rank 1" in str(_worker_failure(error)) and "SIGKILL" in str(error.__cause__)
    _, again = within(5, lambda: greedy_tokens(llm, PROMPTS, 4))
    assert "earlier failure" in str(_worker_failure(again))


class _Corrupting:
    """A worker's pipe that sends it every step with positions past the model's context, so
    the worker raises in its forward while the driver waits in the first all-reduce."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def send_bytes(self, data: bytes) -> None:
        msg = decode(data)
        if isinstance(msg, StepMessage):
            msg.positions = to_wire(from_wire(msg.positions) + 10**6)
            data = encode(msg)
        self._conn.send_bytes(data)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_a_worker_raising_mid_step_fails_the_step_with_its_traceback(tiny_path):
    llm = LLM(tiny_path, tensor_parallel_size=2, **ENGINE)
    executor = llm.engine.executor
    executor.conns[0] = _Corrupting(executor.conns[0])
    start = time.monotonic()
    _, error = within(30, lambda: greedy_tokens(llm, PROMPTS, 2))
    message = str(_worker_failure(error))
    assert "rank 1" in message and "raised" in message and "IndexError" in message
    assert time.monotonic() - start < 30
    assert all(p.exitcode is not None for p in executor.procs)  # stopped, not left behind


@pytest.mark.slow
def test_a_stuck_worker_fails_the_step_after_the_timeout(tiny_path):
    """SIGSTOP: alive but silent, so only the collective's timeout can tell."""
    llm = LLM(tiny_path, tensor_parallel_size=2, distributed_timeout=3, **ENGINE)
    greedy_tokens(llm, PROMPTS, 2)
    worker = llm.engine.executor.procs[0]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        _, error = within(60, lambda: greedy_tokens(llm, PROMPTS, 4))
        assert "did not answer within distributed_timeout=3 s" in str(_worker_failure(error))
    finally:
        if worker.exitcode is None:
            os.kill(worker.pid, signal.SIGKILL)


def test_shutdown_stops_every_worker(tiny_path):
    llm = LLM(tiny_path, pipeline_parallel_size=2, **ENGINE)
    procs = list(llm.engine.executor.procs)
    within(30, llm.shutdown)
    assert all(p.exitcode == 0 for p in procs)
    with pytest.raises(StepFailedError) as error:
        greedy_tokens(llm, PROMPTS, 2)
    assert "shut down" in str(error.value.__cause__)
