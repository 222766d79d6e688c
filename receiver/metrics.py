"""Prometheus instruments of one receiver app (its own registry, so several apps can share a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aeic.receiver.storage import Status
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ReceiverMetrics"]

_MS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class _JobsCollector(Collector):
    """Images per status, read from the database at scrape time (correct across restarts and replicas)."""

    def __init__(self, counts: Callable[[], dict[Status, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("aeic_images", "Stored images by decode status", labels=["status"])
        for status, count in self._counts().items():
            family.add_metric([status.value], count)
        yield family


class ReceiverMetrics:
    """Counters and histograms the API and the worker update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploads = Counter("aeic_uploads", "Upload requests by outcome", ["outcome"], registry=self.registry)
        self.upload_bytes = Histogram(
            "aeic_upload_bytes", "Accepted bitstream sizes", registry=self.registry,
            buckets=(256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576),
        )
        self.decoded = Counter("aeic_decoded", "Decode attempts by outcome", ["outcome"], registry=self.registry)
        self.batch_size = Histogram("aeic_decode_batch_size", "Images per decode batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.entropy_ms = Histogram("aeic_entropy_decode_ms", "Entropy decoding time per image (ms)",
                                    registry=self.registry, buckets=_MS_BUCKETS)
        self.decoder_ms = Histogram("aeic_decoder_ms", "Neural decoder time per image (ms)",
                                    registry=self.registry, buckets=_MS_BUCKETS)
        self.decode_ms = Histogram("aeic_decode_ms", "Total decode time per image (ms)",
                                   registry=self.registry, buckets=_MS_BUCKETS)

    def watch_jobs(self, counts: Callable[[], dict[Status, int]]) -> None:
        """Export the per-status image gauge from `counts`."""
        self.registry.register(_JobsCollector(counts))
