"""Prometheus instruments of one receiver app (its own registry, so several apps can share a process)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from aeic.receiver.storage import Status
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ReceiverMetrics"]

log = logging.getLogger(__name__)

_MS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class _JobsCollector(Collector):
    """Images per status, read from the database at scrape time (correct across restarts and replicas).

    A scrape while the database fails leaves the gauge out (and says so in the log) instead of failing:
    the whole exposition answered 503 then, so an outage hid the very counters that show it."""

    def __init__(self, counts: Callable[[], dict[Status, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._counts()
        except Exception as exc:  # noqa: BLE001 - any database failure; the rest of the scrape still answers
            log.warning("metrics: aeic_images left out of this scrape, the database failed: %s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        family = GaugeMetricFamily("aeic_images", "Stored images by decode status", labels=["status"])
        for status, count in counts.items():
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
