"""The team's session list, live: ``session.created``, ``session.updated``,
``session.deleted`` and ``session.activity`` pushed to the sockets
subscribed to the ``sessions`` channel, on every instance, through the bus.

A sidebar subscribes first, then lists the sessions over REST, and applies
the events that follow.

Order
    A writer publishes from inside its transaction, once its row is written
    (:meth:`SessionFeed.changed`, :meth:`SessionFeed.deleted`): a second
    write of the same session waits for the first one's row lock, so it
    publishes after the first has committed, and the events of one session
    reach every subscriber in the order their writes committed. A commit
    that fails after its publish has announced a change that did not
    happen; the next event or list corrects it.

Bus reconnections
    What is published while this instance's subscription is down never
    reaches it. Once it is back, every subscriber here gets
    ``sessions.resync``: reload the list over REST.
"""

from __future__ import annotations

import logging
from typing import Any

from chathub.server.bus import Bus
from chathub.server.frames import encode
from chathub.server.hub import Hub

log = logging.getLogger("chathub.session_feed")

CHANNEL = "sessions"
RESYNC_FRAME = encode({"type": "sessions.resync"})


class SessionFeed:
    def __init__(self, *, bus: Bus, hub: Hub) -> None:
        self.bus = bus
        self.hub = hub
        self._unsubscribe = bus.subscribe(CHANNEL, self._on_message)
        self._unregister = bus.on_reconnect(self._on_reconnect)

    async def changed(self, team_id: str, session: dict[str, Any], *, created: bool) -> None:
        """``session`` (its JSON view) was created or changed; call it from
        inside the writer's transaction, after the write (see Order)."""
        event = "session.created" if created else "session.updated"
        await self._publish(team_id, {"type": event, "session": session})

    async def activity(self, team_id: str, session_id: str, last_seq: int, at: str) -> None:
        """A message was stored in the session (at ``at``, its
        ``created_at``), or a reply there ended (at ``at``, its
        ``completed_at``, now the session's ``last_message_at``), as the
        session's event ``last_seq``. Published after the fact: a subscriber
        keeps the one with the highest ``last_seq``."""
        await self._publish(
            team_id,
            {
                "type": "session.activity",
                "session_id": session_id,
                "last_seq": last_seq,
                "last_message_at": at,
            },
        )

    async def deleted(self, team_id: str, session_id: str) -> None:
        """As :meth:`changed`, for a deleted session."""
        await self._publish(team_id, {"type": "session.deleted", "session_id": session_id})

    async def _publish(self, team_id: str, event: dict[str, Any]) -> None:
        # A publish that fails loses the event, as one the bus drops; the
        # write goes on.
        try:
            await self.bus.publish(CHANNEL, {"team_id": team_id, "event": event})
        except Exception:
            log.exception("a %s event of team %s was not published", event["type"], team_id)

    def _on_message(self, message: dict[str, Any]) -> None:
        team_id, event = message.get("team_id"), message.get("event")
        if isinstance(team_id, str) and isinstance(event, dict):
            self.hub.send_sessions(team_id, encode(event))

    def _on_reconnect(self) -> None:
        self.hub.send_sessions_everywhere(RESYNC_FRAME)

    def close(self) -> None:
        self._unsubscribe()
        self._unregister()
