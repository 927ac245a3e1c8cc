"""Erases sessions and file records some days after their delete
(``CHATHUB_PURGE_DELETED_AFTER_DAYS``): a delete hides them at once, and
this makes it final. Every instance runs one; erasing is idempotent, so
they need no coordination."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.config import Settings
from chathub.storage.models import utcnow
from chathub.storage.repositories.purge import purge_files, purge_sessions

log = logging.getLogger("chathub.purger")

EVERY_S = 3600.0
FIRST_AFTER_S = 60.0
"""The first round waits a little, for startup to settle."""
BATCH = 500


class Purger:
    def __init__(
        self, *, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
    ) -> None:
        self.after = timedelta(days=settings.purge_deleted_after_days)
        self.sessionmaker = sessionmaker
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.after:  # 0: keep for ever
            self._task = asyncio.create_task(self._forever(), name="purger")

    async def _forever(self) -> None:
        await asyncio.sleep(FIRST_AFTER_S)
        while True:
            try:
                await self.purge_once()
            except Exception:  # the next round tries again
                log.exception("could not erase deleted sessions and files")
            await asyncio.sleep(EVERY_S)

    async def purge_once(self) -> tuple[int, int]:
        """Erase everything deleted before the retention time; returns the
        sessions and the file records erased."""
        before = utcnow() - self.after
        counts = []
        for purge in (purge_sessions, purge_files):
            total = 0
            while (n := await purge(self.sessionmaker, deleted_before=before, limit=BATCH)) > 0:
                total += n
                if n < BATCH:
                    break
            counts.append(total)
        sessions, files = counts
        if sessions or files:
            log.info("erased %d deleted sessions and %d deleted file records", sessions, files)
        return sessions, files

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
