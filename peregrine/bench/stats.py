"""Summary statistics of latency samples (the percentiles every table reports)."""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, median, p90, p99, min, max of `values` times `scale` (1000: seconds to ms);
    None everywhere when there are no values."""
    keys = ("mean", "median", "p90", "p99", "min", "max")
    if not values:
        return dict.fromkeys(keys)
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, PERCENTILES)
    return {"mean": float(a.mean()), "median": float(p50), "p90": float(p90),
            "p99": float(p99), "min": float(a.min()), "max": float(a.max())}
