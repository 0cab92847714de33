"""Which rank does what: tp x pp ranks, stage-major (rank = stage * tp + tp_rank), and the
checks that a model can be split that way."""

from __future__ import annotations

from dataclasses import dataclass

from peregrine.models.config import ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    """One rank's place among tensor_parallel x pipeline_parallel ranks; rank 0 drives.
    With `expert_parallel` a stage's tensor-parallel ranks split MoE layers by whole
    experts instead of each expert's columns."""

    tp: int
    pp: int
    rank: int = 0
    expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        """This rank's index in its stage's tensor-parallel group."""
        return self.rank % self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    def stage_ranks(self, stage: int) -> list[int]:
        """The global ranks of one stage's tensor-parallel group."""
        return list(range(stage * self.tp, (stage + 1) * self.tp))

    def peer(self, stage: int) -> int:
        """The rank with this rank's tensor-parallel index in `stage`."""
        return stage * self.tp + self.tp_rank

    @property
    def last_stage_leader(self) -> int:
        """The rank that sends the final hidden states back to the driver."""
        return (self.pp - 1) * self.tp

    def stage_layers(self, num_layers: int, stage: int | None = None) -> range:
        """The contiguous decoder layers of `stage` (this rank's by default); earlier stages
        take one more layer when the split is uneven."""
        stage = self.stage if stage is None else stage
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (stage < extra))


def balanced_span(total: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of part `index` of `total` items cut into `parts` runs of whole `unit`s
    (the last unit may be short), earlier parts one unit longer when it does not divide."""
    units = -(-total // unit)
    base, extra = divmod(units, parts)
    start = index * base + min(index, extra)
    end = start + base + (index < extra)
    return min(start * unit, total), min(end * unit, total)


def attention_heads(num_heads: int, num_kv_heads: int, tp: int, rank: int
                    ) -> tuple[int, int, int, int]:
    """(first query head, query heads, first KV head, KV heads) of tensor-parallel rank
    `rank`. With at least as many KV heads as ranks, ranks take whole GQA groups (a KV head
    and its query heads; earlier ranks one group more when they do not divide evenly, e.g.
    SmolLM2's 3 groups on 2 ranks); with fewer, each KV head is replicated on the
    tp / num_kv_heads ranks that split its query heads."""
    group = num_heads // num_kv_heads  # query heads per KV head
    if num_kv_heads >= tp:
        kv_start, kv_end = balanced_span(num_kv_heads, tp, rank)
        return kv_start * group, (kv_end - kv_start) * group, kv_start, kv_end - kv_start
    if tp % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads neither split over nor replicate evenly "
                         f"on tensor_parallel_size={tp}")
    sharing = tp // num_kv_heads  # ranks holding one KV head
    if group < sharing:
        raise ValueError(f"{num_heads} attention heads are fewer than "
                         f"tensor_parallel_size={tp}")
    kv = rank // sharing
    q_start, q_end = balanced_span(group, sharing, rank % sharing)
    return kv * group + q_start, q_end - q_start, kv, 1


def expert_span(num_experts: int, ranks: int, rank: int) -> range:
    """The router ids of the whole experts rank `rank` of `ranks` holds under expert
    parallelism: E*r//N .. E*(r+1)//N - 1, so counts differ by at most one and the larger
    shares fall on later ranks (8 experts on 3 ranks: 2, 3, 3)."""
    return range(num_experts * rank // ranks, num_experts * (rank + 1) // ranks)


def check_splittable(cfg: ModelConfig, tp: int, pp: int, expert_parallel: bool = False
                     ) -> None:
    """Raise ValueError saying why `cfg` cannot run on tp x pp ranks."""
    attention_heads(cfg.num_heads, cfg.num_kv_heads, tp, 0)
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    widths = {"intermediate_size": cfg.intermediate_size if dense else 0}
    if tp > 1 and cfg.is_moe:
        widths["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        if not expert_parallel:
            widths["moe_intermediate_size"] = cfg.moe_intermediate_size
        elif cfg.num_experts < tp:
            raise ValueError(f"expert parallelism gives every rank whole experts: "
                             f"{cfg.num_experts} experts are fewer than "
                             f"tensor_parallel_size={tp}; split each expert instead (without "
                             "enable_expert_parallel)")
    for field, width in widths.items():
        if width and width < 32 * tp:
            raise ValueError(f"{field} {width} is too small to split over "
                             f"tensor_parallel_size={tp}")
    if pp > cfg.num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} is more stages than the model's "
                         f"{cfg.num_layers} layers")
    if pp > 1 and cfg.is_gemma:
        raise ValueError("pipeline parallelism runs the Llama family; Gemma scales its "
                         "embedding inside the forward pass, which a later stage must skip")
