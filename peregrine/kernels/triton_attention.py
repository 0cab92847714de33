"""The Triton attention backend: KV write, paged decode and chunked prefill as Triton kernels.

Same contract as the torch backend (the reference it is tested against). Per layer it only
launches kernels: the host numbers the launches need (how many decodes, the longest
decode context, the longest prefill chunk) come from the step's host-side metadata and
are computed once per step, so no layer reads a device tensor back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.kernels.triton.decode_attention import DecodeTiles, paged_decode_attention
from peregrine.kernels.triton.kv_write import kernels_interpreted, write_kv
from peregrine.kernels.triton.prefill_attention import PrefillTiles, prefill_attention


@dataclass(frozen=True)
class LaunchPlan:
    """What one step's kernels need to know on the host."""

    num_decodes: int
    max_decode_len: int  # longest context among the decodes (sizes the split-K plan)
    max_prefill_query_len: int  # longest chunk among the other sequences


def launch_plan(meta: AttentionMetadata, has_cache: bool) -> LaunchPlan:
    """The launch plan of a step (without a cache every sequence runs as a prefill)."""
    nd = meta.num_decodes if has_cache else 0
    qs = meta.query_start_loc
    return LaunchPlan(
        num_decodes=nd, max_decode_len=max(meta.seq_lens[:nd], default=0),
        max_prefill_query_len=max((qs[i + 1] - qs[i] for i in range(nd, meta.num_seqs)),
                                  default=0))


def default_decode_tiles(device: torch.device) -> DecodeTiles:
    """Decode tiles: ~4 programs per SM on a GPU. The CPU interpreter pays per program and
    per op, not for parallelism: there, no split-K unless asked (tests ask)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return DecodeTiles(block_n=64, target_programs=4 * sms)
    return DecodeTiles(block_n=32, target_programs=1)


def default_prefill_tiles(device: torch.device) -> PrefillTiles:
    """Prefill tiles: 64 x 64 on a GPU, 64 x 32 under the interpreter."""
    if device.type == "cuda":
        return PrefillTiles(block_m=64, block_n=64)
    return PrefillTiles(block_m=64, block_n=32)


def check_triton_device(device: torch.device) -> None:
    """Triton kernels run on CUDA, or on the CPU only under Triton's interpreter."""
    if device.type == "cpu" and not kernels_interpreted():
        raise ValueError("attention_backend='triton' on the CPU needs TRITON_INTERPRET=1 in the "
                         "environment before peregrine starts (slow: for tests); use 'torch'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"attention_backend='triton' does not support device {device.type!r}")


class TritonAttentionBackend:
    """Paged attention through Triton kernels (GPU; CPU under the Triton interpreter)."""

    supports_softcap = True

    def __init__(self, device: torch.device | str | None = None,
                 decode_tiles: DecodeTiles | None = None,
                 prefill_tiles: PrefillTiles | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            check_triton_device(self.device)
        self.decode_tiles = decode_tiles
        self.prefill_tiles = prefill_tiles
        self._planned: tuple[AttentionMetadata, bool, LaunchPlan] | None = None

    def _tiles(self, device: torch.device) -> tuple[DecodeTiles, PrefillTiles]:
        if self.decode_tiles is None:
            self.decode_tiles = default_decode_tiles(device)
        if self.prefill_tiles is None:
            self.prefill_tiles = default_prefill_tiles(device)
        return self.decode_tiles, self.prefill_tiles

    def plan(self, meta: AttentionMetadata, has_cache: bool) -> LaunchPlan:
        """The step's launch plan, computed by the first layer and reused by the others."""
        last = self._planned
        if last is None or last[0] is not meta or last[1] != has_cache:
            last = self._planned = (meta, has_cache, launch_plan(meta, has_cache))
        return last[2]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: LayerCache | None, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, softcap: float | None = None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> out [T, Hq, D]; with `softcap`, the scaled
        scores s become softcap * tanh(s / softcap) before the mask."""
        decode_tiles, prefill_tiles = self._tiles(q.device)
        plan = self.plan(meta, cache is not None)
        if cache is not None:
            write_kv(cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = plan.num_decodes
        if nd:
            paged_decode_attention(
                q[:nd], cache.k, cache.v, cache.k_scale, cache.v_scale, meta.block_tables[:nd],
                meta.seq_lens_t[:nd], out[:nd], scale, sliding_window, plan.max_decode_len,
                decode_tiles, softcap)
        if nd < meta.num_seqs:
            paged = cache is not None
            prefill_attention(
                q, k, v, cache.k if paged else None, cache.v if paged else None,
                cache.k_scale if paged else None, cache.v_scale if paged else None,
                meta.block_tables if paged else None, meta.query_start_loc_t, meta.seq_lens_t,
                out, nd, meta.num_seqs - nd, plan.max_prefill_query_len, scale, sliding_window,
                prefill_tiles, softcap)
        return out
