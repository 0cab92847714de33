"""Energy and cost figures of a benchmark run: joules per token, tokens per kWh, cost per
million tokens, always next to where the joules came from (measured or modelled)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peregrine.bench.results import table
from peregrine.energy.accounting import JOULES_PER_KWH

if TYPE_CHECKING:
    from peregrine.engine.llm_engine import LLMEngine


class RunEnergy:
    """Reads an engine's power meter at the start of a measured span and summarises it."""

    def __init__(self, engine: "LLMEngine") -> None:
        self.engine = engine
        acc = engine.energy
        self.start = acc.meter.joules() if acc is not None else None

    def summary(self, output_tokens: int, total_tokens: int, wall_s: float
                ) -> dict[str, Any] | None:
        """The span's figures (None when the engine's power_source is off)."""
        acc = self.engine.energy
        if acc is None or self.start is None:
            return None
        return energy_figures(acc.meter.joules() - self.start, acc.source,
                              acc.meter.description, output_tokens, total_tokens, wall_s,
                              acc.price_per_hour)


def energy_figures(joules: float, source: str, description: str, output_tokens: int,
                   total_tokens: int, wall_s: float, price_per_hour: float = 0.0
                   ) -> dict[str, Any]:
    """Joules per token, tokens per kWh, mean watts and (priced) dollars per million output
    tokens of a span that used `joules` over `wall_s` seconds."""
    kwh = joules / JOULES_PER_KWH
    out: dict[str, Any] = {
        "source": source, "description": description, "joules": joules,
        "mean_watts": joules / wall_s if wall_s > 0 else None,
        "joules_per_output_token": joules / output_tokens if output_tokens else None,
        "joules_per_token": joules / total_tokens if total_tokens else None,
        "output_tokens_per_kwh": output_tokens / kwh if kwh > 0 else None,
        "tokens_per_kwh": total_tokens / kwh if kwh > 0 else None,
        "price_per_hour": price_per_hour or None, "usd_per_mtok_output": None}
    if price_per_hour > 0 and output_tokens:
        # the device is busy for the whole span: it pays wall time, not joules
        out["usd_per_mtok_output"] = price_per_hour * wall_s / 3600 / output_tokens * 1e6
    return out


def energy_table(runs: list[dict[str, Any]]) -> str:
    """One row per run that carries `energy`, then each distinct source's description."""
    rows, sources = [], []
    for run in runs:
        e = run.get("energy")
        if not e:
            continue
        rows.append([run.get("label", ""), e["source"], e["joules"], e["mean_watts"],
                     _sig(e["joules_per_output_token"]), _sig(e["joules_per_token"]),
                     e["output_tokens_per_kwh"], e["usd_per_mtok_output"]])
        if e["description"] not in sources:
            sources.append(e["description"])
    if not rows:
        return ""
    head = table(["run", "power source", "joules", "mean W", "J / output token", "J / token",
                  "output tok / kWh", "$ / M output tok"], rows)
    return head + "\n\n" + "\n".join(f"Power: {s}." for s in sources)


def _sig(x: float | None) -> str | None:
    # joules per token are often below 1: three significant digits, not two decimals
    return None if x is None else f"{x:.3g}"
