"""The order in which one model generates: users' replies before background
work (see :mod:`chathub.llm.local`, "Order")."""

from __future__ import annotations

import asyncio
import threading


class GenerationOrder:
    """When a generation may go to the model's worker thread: an interactive
    one at once; a background one after the background ones before it, and
    only while no interactive one is waiting or running. An interactive one
    arriving sets the stop flag of the background one on the worker. For the
    event loop's use only."""

    def __init__(self) -> None:
        self._interactive = 0
        self._no_interactive = asyncio.Event()
        self._no_interactive.set()
        self._background = asyncio.Lock()
        self._running: threading.Event | None = None
        """The stop flag of the background generation on the worker, if any."""

    @property
    def background_running(self) -> bool:
        """Whether a background generation has gone to the worker and not ended."""
        return self._running is not None

    async def begin(self, stop: threading.Event, *, background: bool) -> None:
        """Wait until a generation may go to the worker; ``stop`` is its stop
        flag. :meth:`end` must follow, once it has ended there."""
        if not background:
            self._interactive += 1
            self._no_interactive.clear()
            if self._running is not None:
                self._running.set()
            return
        await self._background.acquire()
        try:
            while self._interactive:
                await self._no_interactive.wait()
        except BaseException:  # cancelled while waiting
            self._background.release()
            raise
        self._running = stop

    def end(self, *, background: bool) -> None:
        """The generation :meth:`begin` let go has ended on the worker."""
        if background:
            self._running = None
            self._background.release()
            return
        self._interactive -= 1
        if not self._interactive:
            self._no_interactive.set()
