"""Queue backends, chosen by ``[queue] backend`` and imported lazily (one registry)."""

from __future__ import annotations

from segproxy.config import Config
from segproxy.queue.base import Queue


async def open_queue(config: Config) -> Queue | None:
    """The configured queue, opened; None for ``backend = "none"`` (synchronous forwarding)."""
    q = config.queue
    if q.backend == "none":
        return None
    if q.backend == "memory":
        from segproxy.queue.memory import MemoryQueue

        return MemoryQueue(
            max_rows=q.max_rows, max_bytes=q.max_bytes, max_dead_bytes=q.max_dead_bytes
        )
    from segproxy.queue.sqlite import SqliteQueue

    return await SqliteQueue(
        q.path,
        max_rows=q.max_rows,
        max_bytes=q.max_bytes,
        min_free_disk_bytes=q.min_free_disk_bytes,
        max_dead_bytes=q.max_dead_bytes,
        synchronous=q.synchronous.upper(),
        lease_seconds=max(120.0, config.upstream.timeout * 4),
    ).open()
