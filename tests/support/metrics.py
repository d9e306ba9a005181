"""Reading Prometheus text pages (/metrics): prometheus_client's own parser, and lookups built on it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def metric_families(text: str) -> list[Metric]:
    """Every metric family of a Prometheus text page, with its type and samples."""
    return list(text_string_to_metric_families(text))


def metric_samples(text: str) -> Iterator[Sample]:
    """Every sample of a Prometheus text page (``name``, ``labels``, ``value``)."""
    for family in metric_families(text):
        yield from family.samples


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed by ``name{label="v",...}`` (labels sorted), plus plain names."""
    out: dict[str, float] = {}
    for s in metric_samples(text):
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``; 0.0 when there is none.

    Args:
        text: a Prometheus text page.
        name: the sample name, with its suffix (``lpt_requests_total``).
        labels: label values the samples must have; the others are summed over.
    """
    matching = (s for s in metric_samples(text) if s.name == name and labels.items() <= s.labels.items())
    return sum((s.value for s in matching), 0.0)
