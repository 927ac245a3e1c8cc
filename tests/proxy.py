"""TCP proxies for outage tests."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from tests.harness import PG_USER, pg_url


class TcpProxy:
    """A TCP proxy in front of a service (Redis, PostgreSQL) that a test can
    cut (drop every connection and refuse new ones) and restore on the same
    port: an outage of the service as its clients see it, without touching
    the service that other tests share."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drop_after: int | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def freeze(self) -> None:
        """Keep every connection open but pass nothing on (a silent network
        partition: no error, no FIN, no RST)."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def drop_next_reply(self, skip: int = 0) -> None:
        """Pass ``skip`` answers on, then drop the connection that carries
        the next one instead (its request did reach Redis)."""
        self._drop_after = skip

    async def stop(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer, answers=True)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if answers and self._drop_after is not None:
                    if self._drop_after == 0:
                        self._drop_after = None
                        break
                    self._drop_after -= 1
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


class RedisProxy(TcpProxy):
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        super().__init__(parts.hostname or "127.0.0.1", parts.port or 6379)
        self.db = parts.path or "/0"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self.db}"


class PgProxy(TcpProxy):
    def __init__(self, database: str) -> None:
        parts = urlsplit(pg_url(database))
        super().__init__(parts.hostname or "127.0.0.1", parts.port or 5432)
        self.database = database

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/{self.database}"
