"""A streamed answer's body on one connection (the dashboard's server-sent events).

Its producer (``Stream.produce``) runs as a task and writes through :meth:`Pump.write`, which
answers False once the client is gone, reads too slowly, or the server stops; the connection
closes when the producer returns. Never on the ingest path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from segproxy.edge.http import Stream

log = logging.getLogger("segproxy.edge")

# A stream's client that lets this much pile up unread is too slow: its stream ends.
STREAM_BACKLOG = 1024 * 1024


class Server(Protocol):
    shutting_down: bool


class Pump:
    __slots__ = ("close", "server", "task", "transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        server: Server,
        close: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.server = server  # its shutting_down ends the stream
        self.close = close  # closes the connection
        self.task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, stream: Stream) -> None:
        self.task = loop.create_task(stream.produce(self.write))
        self.task.add_done_callback(self._done)

    def write(self, data: bytes) -> bool:
        transport = self.transport
        if transport.is_closing() or self.server.shutting_down:
            return False
        if transport.get_write_buffer_size() > STREAM_BACKLOG:
            self.close()
            return False
        transport.write(data)
        return True

    def stop(self) -> None:
        """The client went away or the server stops: end the producer (then the connection)."""
        if self.task is not None:
            self.task.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("a stream's producer failed: %r", task.exception())
        self.close()
