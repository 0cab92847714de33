"""One Prometheus exposition of several replicas' metrics: each replica's samples get a
`replica` label, and a family the replicas share is written once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class _Families:
    """A collector yielding already-built metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_replica_metrics(texts: Mapping[str, str | bytes], label: str = "replica") -> bytes:
    """The expositions in `texts` (replica id -> Prometheus text) as one, every sample
    labelled with its replica's id."""
    merged: dict[str, Metric] = {}
    for replica, text in texts.items():
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation,
                                                    family.type, family.unit)
            into.samples.extend(Sample(s.name, {**s.labels, label: replica}, s.value,
                                       s.timestamp, s.exemplar) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))  # type: ignore[arg-type]
    return generate_latest(registry)
