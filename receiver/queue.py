"""Decode jobs on a Redis Stream with a consumer group, for API replicas and separate worker processes.

Why Redis Streams: delivery to many consumers (XREADGROUP), explicit acknowledgement (XACK), a pending
list that survives a dead consumer and can be taken over after a timeout (XAUTOCLAIM), and a lag figure
that autoscalers (KEDA) read. The stream only says "image X needs decoding": the bitstream and every result
live in the database and the blob store, so losing Redis loses no data (`orphaned_ids` re-enqueues), and
the database's order, fair across devices, decides which image a worker decodes next
(`stream_worker.StreamWorker`); an entry is acknowledged once its image needs no more work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_DEAD_STREAM", "DEFAULT_GROUP", "DEFAULT_STREAM", "Backlog", "Job", "JobQueue"]

DEFAULT_STREAM = "aeic:decode"
DEFAULT_GROUP = "aeic-decoders"
DEFAULT_DEAD_STREAM = "aeic:decode:dead"


@dataclass(frozen=True)
class Job:
    """One stream entry: decode `image_id`."""

    entry_id: str
    image_id: str


@dataclass(frozen=True)
class Backlog:
    """Entries never delivered to the group (`lag`, None if Redis cannot tell) and delivered but unacked."""

    lag: int | None
    pending: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _jobs(entries: Sequence[Any]) -> list[Job]:
    jobs = []
    for entry_id, fields in entries:
        if fields is None:  # deleted while pending
            continue
        image = fields.get(b"image", fields.get("image"))
        if image is not None:
            jobs.append(Job(_text(entry_id), _text(image)))
    return jobs


class JobQueue:
    """Publish, consume, acknowledge, reclaim and dead-letter decode jobs."""

    def __init__(self, client: Any, stream: str = DEFAULT_STREAM, group: str = DEFAULT_GROUP,
                 dead_stream: str = DEFAULT_DEAD_STREAM) -> None:
        self.client, self.stream, self.group, self.dead_stream = client, stream, group, dead_stream

    @classmethod
    def from_url(cls, url: str, **names: str) -> JobQueue:
        """`redis://[:password@]host:port/db` (or `rediss://` for TLS)."""
        import redis

        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"queue URL must be redis://host:port/db, got {url!r}")
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)
        return cls(client, **names)

    def ensure_group(self) -> None:
        """Create the stream and the consumer group (reading from the start) unless they exist."""
        import redis

        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def ping(self) -> None:
        """Raise when Redis is unreachable."""
        self.client.ping()

    def publish(self, image_id: str) -> str:
        """Enqueue a decode of `image_id` (after the upload is durably stored); returns the entry id."""
        return _text(self.client.xadd(self.stream, {"image": image_id}))

    def read(self, consumer: str, count: int, block_ms: int) -> list[Job]:
        """New entries for `consumer`, waiting up to `block_ms` when there are none."""
        reply = self.client.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count, block=block_ms)
        return _jobs(reply[0][1]) if reply else []

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Job]:
        """Take over entries another consumer has held unacknowledged for `min_idle_ms` (it died)."""
        reply = self.client.xautoclaim(self.stream, self.group, consumer, min_idle_time=min_idle_ms,
                                       start_id="0-0", count=count)
        return _jobs(reply[1])

    def touch(self, consumer: str, jobs: Sequence[Job]) -> None:
        """Heartbeat: reset the idle time of entries still being worked on so nobody reclaims them."""
        if jobs:
            self.client.xclaim(self.stream, self.group, consumer, min_idle_time=0,
                               message_ids=[j.entry_id for j in jobs], justid=True)

    def ack(self, jobs: Sequence[Job]) -> None:
        """Done with these entries: acknowledge and drop them from the stream (keeps it small)."""
        if jobs:
            ids = [j.entry_id for j in jobs]
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.execute()

    def dead_letter(self, job: Job, reason: str, attempts: int) -> None:
        """Move an entry that will not be decoded to the dead-letter stream, atomically with its ack."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, {"image": job.image_id, "entry": job.entry_id, "reason": reason[:2000],
                                     "attempts": str(attempts)})
        pipe.xack(self.stream, self.group, job.entry_id)
        pipe.xdel(self.stream, job.entry_id)
        pipe.execute()

    def backlog(self) -> Backlog:
        """The group's lag and pending count (what KEDA scales on)."""
        for group in self.client.xinfo_groups(self.stream):
            if _text(group.get("name", group.get(b"name", ""))) == self.group:
                lag = group.get("lag", group.get(b"lag"))
                return Backlog(lag=None if lag is None else int(lag),
                               pending=int(group.get("pending", group.get(b"pending", 0))))
        return Backlog(lag=None, pending=0)

    def queued_image_ids(self, page: int = 1000) -> set[str]:
        """Images that have an entry in the stream, delivered or not (acknowledged entries are deleted, so
        this is the backlog, not the history)."""
        ids: set[str] = set()
        start = "-"
        while True:
            entries = self.client.xrange(self.stream, min=start, max="+", count=page)
            ids.update(job.image_id for job in _jobs(entries))
            if len(entries) < page:
                return ids
            start = "(" + _text(entries[-1][0])

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered entries (for operators and tests)."""
        return [{_text(k): _text(v) for k, v in fields.items()}
                for _id, fields in self.client.xrevrange(self.dead_stream, count=count)]

    def lock(self, name: str, seconds: float) -> bool:
        """A best-effort cluster-wide "only one of us does this now" (SET NX with expiry)."""
        return bool(self.client.set(f"{self.stream}:lock:{name}", "1", nx=True, px=int(seconds * 1000)))

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()
