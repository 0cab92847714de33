"""A worker process: joins the groups, loads the model and keeps its part, allocates its
part of the KV pool, then runs every step message the driver sends until told to stop.

Whatever a worker raises goes back to the driver as text through its pipe, and the worker
exits at once: its sockets close, so a driver blocked in a collective with it fails within
milliseconds instead of waiting for the timeout."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from peregrine.attention_backend import (AttentionMetadata, allocate_kv_pool,
                                         get_attention_backend)
from peregrine.config import EngineConfig
from peregrine.distributed.groups import create_groups
from peregrine.distributed.layout import ParallelLayout
from peregrine.distributed.messages import (LogitsRequest, Shutdown, StepMessage, decode,
                                            from_wire)
from peregrine.distributed.sharding import shard_model
from peregrine.distributed.stage import StageRunner
from peregrine.engine.kv_cache import copy_kv_blocks
from peregrine.models.loader import load_model_for

# Columns of the shared timing table, one row per rank.
STEPS, BUSY, COMM, MESSAGE = range(4)


@dataclass
class WorkerSpec:
    """What a worker needs to start: the engine's config, its rank, where to rendezvous."""

    config: EngineConfig
    rank: int
    store_port: int
    timings: torch.Tensor  # [world, 4] float64 in shared memory: steps, busy, comm, message s


def rank_threads(config: EngineConfig) -> int:
    """torch threads per rank on the CPU: the configured count, else the cores shared out."""
    if config.num_threads:
        return config.num_threads
    return max(1, len(os.sched_getaffinity(0)) // config.world_size)


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's entry point (torch.multiprocessing spawn)."""
    try:
        _serve(spec, conn)
    except (EOFError, BrokenPipeError):
        pass  # the driver is gone: nothing to report to
    except BaseException:  # noqa: BLE001 - reported to the driver, then this process ends
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    # Skip interpreter teardown: the process groups' threads must not outlive their sockets.
    os._exit(0)


def _serve(spec: WorkerSpec, conn: Connection) -> None:
    cfg = spec.config
    device = cfg.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(spec.rank)
        device = torch.device("cuda", spec.rank)
    else:
        torch.set_num_threads(rank_threads(cfg))
    layout = ParallelLayout(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, spec.rank,
                            cfg.enable_expert_parallel)
    conn.send(("hello", os.getpid()))
    store = dist.TCPStore("127.0.0.1", spec.store_port, layout.world_size, is_master=False,
                          timeout=timedelta(seconds=cfg.distributed_timeout))
    groups = create_groups(layout, store, device, cfg.distributed_timeout)
    loaded = load_model_for(cfg, device)
    model = loaded.model
    kv_config = shard_model(model, layout, groups)
    model.set_attention_backend(get_attention_backend(cfg.attention_backend, device,
                                                      model.config))
    init = conn.recv()
    if not isinstance(init, tuple):  # shut down before it started: the driver's load failed
        return
    num_blocks = init[1]
    kv_caches = allocate_kv_pool(kv_config, num_blocks, cfg.block_size, cfg.torch_dtype,
                                 device, cfg.kv_cache_dtype)
    stage = StageRunner(model, kv_caches, layout, groups, device)
    conn.send(("ready", None))
    row = spec.timings[spec.rank]
    while True:
        data = conn.recv_bytes()
        t0, comm0 = time.perf_counter(), groups.comm_seconds
        msg = decode(data)
        t1 = time.perf_counter()
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, StepMessage):
            _step(stage, msg, device)
            row[STEPS] += 1
        elif isinstance(msg, LogitsRequest):
            with torch.inference_mode():
                model.compute_logits(from_wire(msg.hidden, device))
        t2 = time.perf_counter()
        row[BUSY] += t2 - t1
        row[COMM] += groups.comm_seconds - comm0
        row[MESSAGE] += t1 - t0


def _step(stage: StageRunner, msg: StepMessage, device: torch.device) -> None:
    """Run one step message through this rank's part of the model."""
    copy_kv_blocks(stage.kv_caches, msg.block_copies)
    slots = None if msg.slot_mapping is None else from_wire(msg.slot_mapping)
    tables = None if msg.block_tables is None else from_wire(msg.block_tables)
    meta = AttentionMetadata.build(msg.query_start_loc, msg.seq_lens, msg.num_decodes, slots,
                                   tables, device)
    stage.forward(from_wire(msg.input_ids, device), from_wire(msg.positions, device), meta,
                  msg.bounds)
