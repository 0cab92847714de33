"""The driver's side of tensor and pipeline parallelism: it starts the worker processes,
sends each of them every step, runs rank 0's own share, and turns any rank's failure into
one clear `WorkerFailedError` instead of a hang.

The scheduler, the KV block bookkeeping and sampling stay in the driver (rank 0, which also
computes); the workers only run the forward passes they are sent. A worker that raises
reports its traceback through its pipe and exits, which breaks the collective the driver
waits in within milliseconds; one that dies is seen by its exit code; one that hangs makes
the driver's collective time out after `distributed_timeout` seconds."""

from __future__ import annotations

import logging
import signal
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.config import EngineConfig
from peregrine.distributed.groups import create_groups
from peregrine.distributed.layout import ParallelLayout
from peregrine.distributed.messages import (LogitsRequest, Message, Shutdown, StepMessage,
                                            encode, to_wire)
from peregrine.distributed.pipeline import reads_ahead, split_microbatches
from peregrine.distributed.sharding import shard_model
from peregrine.distributed.stage import StageRunner
from peregrine.distributed.worker import (BUSY, COMM, MESSAGE, STEPS, WorkerSpec, rank_threads,
                                          run_worker)
from peregrine.models.config import ModelConfig
from peregrine.models.llama import LlamaForCausalLM

logger = logging.getLogger("peregrine")

T = TypeVar("T")

# How long the driver waits, after a collective failed, for a worker to report why.
_DIAGNOSE_S = 5.0
_SPAWN_HINT = (" before it started (its stderr says why; a script that creates a parallel "
               "engine at import time needs `if __name__ == \"__main__\":`, since spawned "
               "workers import the main module)")


class WorkerFailedError(RuntimeError):
    """A rank raised, died or stopped answering: the workers are stopped and the engine
    cannot step any more."""


@dataclass
class RankStats:
    """Where one rank's time went, per step, since start."""

    rank: int
    steps: int
    step_seconds: float  # busy time per step: compute + communication + message handling
    comm_seconds: float  # in collectives and transfers (waiting for slower ranks included)
    message_seconds: float  # building and sending (driver) or decoding (worker) step messages

    @property
    def compute_seconds(self) -> float:
        return self.step_seconds - self.comm_seconds - self.message_seconds


class DistributedExecutor:
    """Rank 0 of tensor_parallel_size x pipeline_parallel_size ranks."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.layout = ParallelLayout(config.tensor_parallel_size,
                                     config.pipeline_parallel_size, 0,
                                     config.enable_expert_parallel)
        self.device = config.torch_device
        if self.device.type == "cuda":
            self.device = torch.device("cuda", 0)
        elif not config.num_threads:  # the ranks share the cores
            torch.set_num_threads(rank_threads(config))
        world = self.layout.world_size
        self.timings = torch.zeros(world, 4, dtype=torch.float64).share_memory_()
        self.failure: WorkerFailedError | None = None
        self.model: LlamaForCausalLM | None = None
        self.stage: StageRunner | None = None
        self.block_size = config.block_size
        timeout = timedelta(seconds=config.distributed_timeout)
        self._store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout,
                                    wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.procs: list[mp.Process] = []
        self.conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        try:
            for rank in range(1, world):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=run_worker, name=f"peregrine-rank-{rank}",
                                   args=(WorkerSpec(config, rank, self._store.port,
                                                    self.timings), theirs), daemon=True)
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
            self._expect("hello", config.distributed_timeout, _SPAWN_HINT)
            self.groups = create_groups(self.layout, self._store, self.device,
                                        config.distributed_timeout)
        except BaseException:
            self.shutdown()
            raise
        logger.info("started %d worker processes (tensor parallel %d x pipeline parallel %d)",
                    world - 1, self.layout.tp, self.layout.pp)

    # --- start-up ---------------------------------------------------------------------------
    def shard(self, model: LlamaForCausalLM) -> ModelConfig:
        """Reduce the driver's model to rank 0's part; returns the config of its KV pool."""
        try:
            return shard_model(model, self.layout, self.groups)
        except BaseException:
            self.shutdown()
            raise

    def start(self, model: LlamaForCausalLM, kv_caches: list[LayerCache],
              num_blocks: int) -> None:
        """Have the workers allocate `num_blocks` KV blocks and wait until they are ready."""
        self.model = model
        self.stage = StageRunner(model, kv_caches, self.layout, self.groups, self.device)
        try:
            for conn in self.conns:
                conn.send(("init", num_blocks))
            self._expect("ready", None)
        except BaseException:
            self.shutdown()
            raise

    def _expect(self, kind: str, timeout: float | None, hint: str = "") -> None:
        """Wait for every worker's `kind` message; raise WorkerFailedError if one fails
        (adding `hint` when it died without a word)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = wait([conn, proc.sentinel], left)
                if not ready:
                    raise self._fail(f"rank {rank} (pid {proc.pid}) did not start within "
                                     f"{timeout:.0f} s")
                if conn in ready:
                    try:
                        got, detail = conn.recv()
                    except (EOFError, OSError):
                        raise self._fail(self._describe_death(rank, proc) + hint) from None
                    if got == "error":
                        raise self._fail(f"rank {rank} (pid {proc.pid}) raised:\n{detail}")
                    if got == kind:
                        break
                elif proc.exitcode is not None:
                    raise self._fail(self._describe_death(rank, proc) + hint)

    # --- steps ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, block_copies: list[tuple[int, int]]) -> torch.Tensor:
        """The final hidden states [T, hidden] of a step, computed by all ranks (each worker
        first makes the step's KV block copies in its own pool)."""
        self._check()
        t0, comm0 = time.perf_counter(), self.groups.comm_seconds
        bounds = [0, meta.num_seqs]
        if self.layout.pp > 1:
            bounds = split_microbatches(meta.query_start_loc, self.layout.pp)
            if reads_ahead(bounds, meta, self.block_size):
                bounds = [0, meta.num_seqs]
        self._send(StepMessage(
            to_wire(input_ids), to_wire(positions), meta.query_start_loc, meta.seq_lens,
            meta.num_decodes, None if meta.slot_mapping is None else to_wire(meta.slot_mapping),
            None if meta.block_tables is None else to_wire(meta.block_tables),
            list(block_copies), bounds), self.conns)
        t1 = time.perf_counter()
        hidden = self._guarded(lambda: self.stage.forward(input_ids, positions, meta, bounds))
        self._account(t0, t1, comm0, step=True)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of final hidden states, by the vocabulary-parallel LM
        head of the first stage's ranks (the driver's alone without tensor parallelism)."""
        self._check()
        t0, comm0 = time.perf_counter(), self.groups.comm_seconds
        if self.layout.tp > 1:
            self._send(LogitsRequest(to_wire(hidden)), self.conns[:self.layout.tp - 1])
        t1 = time.perf_counter()
        logits = self._guarded(lambda: self.model.compute_logits(hidden))
        self._account(t0, t1, comm0, step=False)
        return logits

    def _send(self, msg: Message, conns: list[Connection]) -> None:
        data = encode(msg)
        for rank, conn in enumerate(conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError:
                raise self._fail(self._describe_death(rank, self.procs[rank - 1])) from None

    def _account(self, t0: float, t1: float, comm0: float, step: bool) -> None:
        row = self.timings[0]
        row[STEPS] += int(step)
        row[BUSY] += time.perf_counter() - t0
        row[COMM] += self.groups.comm_seconds - comm0
        row[MESSAGE] += t1 - t0

    def _guarded(self, run: Callable[[], T]) -> T:
        """`run()`; any failure inside (a collective broken by a dead rank, a timeout, an
        error of the driver's own share) becomes WorkerFailedError naming the cause."""
        try:
            return run()
        except Exception as e:  # noqa: BLE001 - every failure here leaves the ranks out of step
            raise self._fail(self._diagnose(e)) from e

    def _check(self) -> None:
        """Raise if the engine already failed or a worker died or reported an error."""
        if self.failure is not None:
            raise WorkerFailedError(f"the distributed engine stopped after an earlier failure: "
                                    f"{self.failure}")
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if conn.poll():
                raise self._fail(self._diagnose(None))
            if proc.exitcode is not None:
                raise self._fail(self._describe_death(rank, proc))

    def _diagnose(self, error: Exception | None) -> str:
        """Why the ranks fell out of step: what a worker reported or how it died (waiting a
        little for the report), else the driver's own error."""
        deadline = time.monotonic() + _DIAGNOSE_S
        while True:
            reasons = []
            for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
                report = _report(conn)
                if report is not None:
                    reasons.append(f"rank {rank} (pid {proc.pid}) raised:\n{report}")
                elif proc.exitcode is not None:
                    reasons.append(self._describe_death(rank, proc))
            if reasons or time.monotonic() > deadline or error is None:
                break
            time.sleep(0.05)
        if reasons:
            return "\n".join(reasons)
        if error is None:
            return "a worker sent a message out of turn"
        if error is not None and "timed out" in str(error).lower():
            return (f"a rank did not answer within distributed_timeout="
                    f"{self.config.distributed_timeout:g} s (stuck or overloaded): {error}")
        return f"the driver's share of the step failed: {type(error).__name__}: {error}"

    @staticmethod
    def _describe_death(rank: int, proc: mp.Process) -> str:
        proc.join(0.5)
        code = proc.exitcode
        if code is None:
            return f"rank {rank} (pid {proc.pid}) closed its pipe"
        if code < 0:
            return f"rank {rank} (pid {proc.pid}) was killed by {signal.Signals(-code).name}"
        return f"rank {rank} (pid {proc.pid}) exited with code {code}"

    def _fail(self, reason: str) -> WorkerFailedError:
        """Stop every worker and remember why; the error to raise."""
        self.failure = WorkerFailedError(reason)
        logger.error("distributed engine failed: %s", reason)
        self.shutdown()
        return self.failure

    # --- stats and shutdown -------------------------------------------------------------------
    def rank_stats(self) -> list[RankStats]:
        """Per-rank time per step since start (read from the shared timing table)."""
        out = []
        for rank, (steps, busy, comm, message) in enumerate(self.timings.tolist()):
            n = max(int(steps), 1)
            out.append(RankStats(rank, int(steps), busy / n, comm / n, message / n))
        return out

    def shutdown(self) -> None:
        """Tell the workers to exit, wait a little, kill those still running (idempotent)."""
        if self.failure is None:
            self.failure = WorkerFailedError("the engine was shut down")
        self._finalizer()
        self.stage = None
        self.groups = None


def _report(conn: Connection) -> str | None:
    """The error a worker sent, if one is waiting in its pipe."""
    try:
        if conn.closed or not conn.poll():
            return None
        kind, detail = conn.recv()
    except (EOFError, OSError):
        return None
    return detail if kind == "error" else None


def _stop_workers(procs: list[mp.Process], conns: list[Connection]) -> None:
    for conn, proc in zip(conns, procs):
        if proc.exitcode is None:
            try:
                conn.send_bytes(encode(Shutdown()))
            except OSError:
                pass
    deadline = time.monotonic() + 5.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join(5.0)
    for conn in conns:
        conn.close()
