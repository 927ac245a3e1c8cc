"""The bus: fire-and-forget messages between instances on named channels
(reply cancellation, dashboard updates). Session events do not go through
here; they have the session log.

Implementations behind one small interface, chosen by URL scheme:
:class:`MemoryBus` (embedded default) and the Redis one
(``chathub.server.redis_bus``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from chathub.config import Settings

log = logging.getLogger("chathub.bus")

Handler = Callable[[dict[str, Any]], Awaitable[None] | None]
ReconnectHandler = Callable[[], Awaitable[None] | None]


class Bus(Protocol):
    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        """Deliver ``message`` to every subscriber of ``channel`` on every
        instance, this one included. At most once."""
        ...

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for each message; returns an idempotent unsubscribe."""
        ...

    def on_reconnect(self, handler: ReconnectHandler) -> Callable[[], None]:
        """Call ``handler()`` whenever this instance may have missed messages
        (its connection to the bus dropped and is back), before the messages
        that follow; returns an idempotent unregister."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool: ...


class MemoryBus:
    """In-process bus: handlers run on the publishing task's loop."""

    def __init__(self) -> None:
        self._handlers: defaultdict[str, list[Handler]] = defaultdict(list)

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        for handler in list(self._handlers.get(channel, ())):
            try:
                result = handler(message)
                if result is not None:
                    await result
            except Exception:
                log.exception("bus handler failed on %s", channel)

    def subscribe(self, channel: str, handler: Handler) -> Callable[[], None]:
        self._handlers[channel].append(handler)

        def unsubscribe() -> None:
            handlers = self._handlers.get(channel)
            if handlers and handler in handlers:
                handlers.remove(handler)
                if not handlers:
                    del self._handlers[channel]

        return unsubscribe

    def on_reconnect(self, handler: ReconnectHandler) -> Callable[[], None]:
        """Never called: in process, no message is lost."""
        return lambda: None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._handlers.clear()

    async def ready(self) -> bool:
        return True


def create_bus(settings: Settings) -> Bus:
    """``CHATHUB_REDIS_URL`` set: the Redis bus; otherwise in-process."""
    if settings.redis_url:
        from chathub.server.redis_bus import RedisBus

        return RedisBus(settings.redis_url, prefix=settings.redis_prefix)
    return MemoryBus()
