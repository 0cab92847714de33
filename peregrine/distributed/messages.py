"""What the driver sends each worker through its pipe: one message per step (the flat
batch's tensors), a request for logits, or shutdown.

Messages travel as pickled bytes with the tensors' raw bytes inside: a pipe rather than a
collective, because a worker may wait for the next step for hours (an idle server), longer
than any collective's timeout should be; and a pipe tells the worker at once when the driver
is gone (EOF)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

WireTensor = tuple[bytes, str, tuple[int, ...]]


def to_wire(t: torch.Tensor) -> WireTensor:
    """A tensor's bytes, dtype and shape (any dtype, bfloat16 included)."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes(), str(t.dtype).removeprefix("torch."), \
        tuple(t.shape)


def from_wire(w: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor `to_wire` encoded, on `device`."""
    data, dtype, shape = w
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t.view(getattr(torch, dtype)).reshape(shape).to(device)


@dataclass
class StepMessage:
    """One step's flat batch, as the model runner prepared it, plus the KV block copies to
    make before it and its micro-batch boundaries (sequence indices, pipeline only)."""

    input_ids: WireTensor
    positions: WireTensor
    query_start_loc: list[int]
    seq_lens: list[int]
    num_decodes: int
    slot_mapping: WireTensor | None  # None: no KV cache (embeddings)
    block_tables: WireTensor | None
    block_copies: list[tuple[int, int]]
    bounds: list[int]


@dataclass
class LogitsRequest:
    """Compute the logits of these final hidden states (vocabulary-parallel LM head)."""

    hidden: WireTensor


@dataclass
class Shutdown:
    """Leave the loop and exit."""


Message = StepMessage | LogitsRequest | Shutdown


def encode(msg: Message) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    return pickle.loads(data)
