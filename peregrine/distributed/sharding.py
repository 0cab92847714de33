"""Turn a loaded model into one rank's part of it, in place: its slice of every layer
(tensor parallel; a mixture of experts' experts by columns or whole) and its stage's
layers (pipeline parallel).

Every rank loads the whole checkpoint and keeps its part; the rest is freed. The model's
own forward then runs unchanged: the modules it calls are the sliced linears, the
row-parallel ones that all-reduce, the vocabulary-parallel embedding and LM head, and at a
stage boundary the modules that receive and send the residual stream."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from peregrine.distributed.groups import RankGroups
from peregrine.distributed.layout import (ParallelLayout, attention_heads, balanced_span,
                                          check_splittable, expert_span)
from peregrine.distributed.pipeline import StageInput, StageOutput
from peregrine.layers.attention import Attention
from peregrine.layers.comm import ParallelGroup
from peregrine.layers.linear import Linear
from peregrine.layers.moe import FusedExperts, SparseMoE
from peregrine.layers.parallel_linear import (RowParallelLinear, VocabParallelEmbedding,
                                              VocabParallelLMHead, linear_from, slice_columns,
                                              slice_rows)
from peregrine.layers.parallel_moe import ParallelMoE, keep_experts, slice_expert_columns
from peregrine.models.config import ModelConfig
from peregrine.models.llama import MLP, LlamaForCausalLM


def _span(start: int, size: int) -> torch.Tensor:
    return torch.arange(start, start + size)


def _row_parallel(lin: nn.Module, start: int, end: int, group: ParallelGroup,
                  name: str) -> RowParallelLinear:
    try:
        inner = slice_columns(lin, start, end)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return RowParallelLinear(inner, lin.bias.data if lin.bias is not None else None, group,
                             lin.in_features)


def shard_attention(attn: Attention, rank: int, tp: int, group: ParallelGroup,
                    name: str) -> None:
    """Keep this rank's query heads and the KV heads they read (see `attention_heads`);
    o_proj becomes row-parallel over the same heads."""
    d = attn.head_dim
    q0, nq, kv0, nkv = attention_heads(attn.num_heads, attn.num_kv_heads, tp, rank)
    q_rows = _span(q0 * d, nq * d)
    k_rows = _span(attn.q_size + kv0 * d, nkv * d)
    v_rows = k_rows + attn.kv_size
    attn.qkv_proj = slice_rows(attn.qkv_proj, torch.cat([q_rows, k_rows, v_rows]))
    attn.o_proj = _row_parallel(attn.o_proj, q0 * d, (q0 + nq) * d, group, f"{name}.o_proj")
    attn.num_heads, attn.num_kv_heads = nq, nkv
    attn.q_size, attn.kv_size = nq * d, nkv * d


def _grid(lin: nn.Module) -> int:
    """The input-column unit a split of `lin` must respect: its quantization group (at
    least the 32-weight grid of every quantized format), 1 for float weights."""
    if isinstance(lin, Linear):
        return 1
    return max(32, getattr(lin, "group_size", None) or 32)


def _mlp_columns(mlp: MLP, rank: int, tp: int) -> tuple[int, int]:
    """Keep this rank's columns [start, end) of gate and up (falling on down_proj's
    quantization groups); returns them for down_proj's split."""
    inter = mlp.down_proj.in_features
    start, end = balanced_span(inter, tp, rank, _grid(mlp.down_proj))
    gate = _span(start, end - start)
    mlp.gate_up_proj = slice_rows(mlp.gate_up_proj, torch.cat([gate, gate + inter]))
    return start, end


def shard_mlp(mlp: MLP, rank: int, tp: int, group: ParallelGroup, name: str) -> None:
    """Keep this rank's columns of gate and up, and the same rows of down (row-parallel);
    the split falls on down_proj's quantization groups."""
    start, end = _mlp_columns(mlp, rank, tp)
    mlp.down_proj = _row_parallel(mlp.down_proj, start, end, group, f"{name}.down_proj")


def shard_moe(moe: SparseMoE, rank: int, tp: int, expert_parallel: bool,
              group: ParallelGroup, name: str) -> ParallelMoE:
    """This rank's part of a sparse block, all-reduced once: whole experts
    (`expert_span`) under expert parallelism, else every expert's columns as a dense MLP
    splits them; the router stays whole, the shared expert splits by columns and adds its
    partial sum before the same all-reduce."""
    experts = moe.experts
    if expert_parallel:
        moe.experts = keep_experts(experts, expert_span(experts.num_experts, tp, rank))
    else:
        if isinstance(experts, FusedExperts):
            inter, grid = experts.down_proj.shape[2], 1
        else:  # every expert quantized alike: the first one's groups stand for all
            inter, grid = experts.down_proj[0].in_features, _grid(experts.down_proj[0])
        start, end = balanced_span(inter, tp, rank, grid)
        moe.experts = slice_expert_columns(experts, start, end, f"{name}.experts")
    if moe.shared_expert is not None:
        shared = moe.shared_expert
        start, end = _mlp_columns(shared, rank, tp)
        try:  # a partial sum without its own all-reduce: the block's one adds it in
            shared.down_proj = slice_columns(shared.down_proj, start, end)
        except ValueError as e:
            raise ValueError(f"{name}.shared_expert.down_proj: {e}") from None
    return ParallelMoE(moe, group)


def shard_vocab(model: LlamaForCausalLM, rank: int, tp: int, group: ParallelGroup) -> None:
    """Split the embedding table and the LM head by vocabulary rows (a tied float head keeps
    sharing the embedding's slice)."""
    vocab = model.config.vocab_size
    shard = -(-vocab // tp)
    start, end = min(rank * shard, vocab), min((rank + 1) * shard, vocab)
    tied = model.lm_head.weight is model.embed_tokens.weight if isinstance(
        model.lm_head, Linear) else False
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.data[start:end],
                                                start, group)
    head = (linear_from(model.embed_tokens.weight, None) if tied
            else slice_rows(model.lm_head, _span(start, end - start)))
    model.lm_head = VocabParallelLMHead(head, vocab, shard, group)


def shard_pipeline(model: LlamaForCausalLM, layout: ParallelLayout, world: ParallelGroup
                   ) -> None:
    """Keep this stage's layers; stand-ins receive from the stage before and send to the
    stage after. The LM head stays with the driver (stage 0), which samples."""
    cfg = model.config
    keep = layout.stage_layers(cfg.num_layers)
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    param = next(model.layers.parameters())
    if not layout.is_first_stage:
        model.embed_tokens = StageInput(world, layout.peer(layout.stage - 1), cfg.hidden_size,
                                        param.dtype, param.device)
        model.lm_head = None
    if not layout.is_last_stage:
        model.norm = StageOutput(world, layout.peer(layout.stage + 1))


def shard_model(model: LlamaForCausalLM, layout: ParallelLayout, groups: RankGroups
                ) -> ModelConfig:
    """Reduce `model` to this rank's part; returns the config of the KV pool it needs (its
    layers, its KV heads)."""
    cfg = model.config
    check_splittable(cfg, layout.tp, layout.pp, layout.expert_parallel)
    tp, rank = layout.tp, layout.tp_rank
    if tp > 1:
        for i, layer in enumerate(model.layers):
            shard_attention(layer.self_attn, rank, tp, groups.tp, f"layers.{i}.self_attn")
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp = shard_moe(layer.mlp, rank, tp, layout.expert_parallel, groups.tp,
                                      f"layers.{i}.mlp")
            else:
                shard_mlp(layer.mlp, rank, tp, groups.tp, f"layers.{i}.mlp")
        shard_vocab(model, rank, tp, groups.tp)
    if layout.pp > 1:
        shard_pipeline(model, layout, groups.world)
    attn = model.layers[0].self_attn
    return replace(cfg, num_layers=len(model.layers), num_heads=attn.num_heads,
                   num_kv_heads=attn.num_kv_heads)
