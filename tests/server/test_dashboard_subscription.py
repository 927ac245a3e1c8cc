"""A dashboard subscriber gets the snapshot first, then every update newer
than it, even those published while the snapshot was being read."""

from __future__ import annotations

from chathub.auth import Principal
from chathub.server.connection import Connection
from chathub.server.hub import Hub
from chathub.server.session_log import MemorySessionLog


async def test_updates_during_the_snapshot_are_held_then_filtered_by_version() -> None:
    hub = Hub(MemorySessionLog())
    conn = Connection(None, "c1", Principal("m1", "t1", "viewer"), max_queue=100)
    other_team = Connection(None, "c2", Principal("m2", "t2", "viewer"), max_queue=100)
    hub.subscribe_dashboard(other_team)
    hub.dashboard_ready(other_team, 0)

    hub.subscribe_dashboard(conn)
    hub.send_dashboard("t1", 4, "v4")  # already in the snapshot (version 5)
    hub.send_dashboard("t1", 6, "v6")  # newer: must follow the snapshot
    assert conn.queue_depth == 0  # nothing may overtake the snapshot
    assert hub.dashboard_ready(conn, 5) == ["v6"]

    hub.send_dashboard("t1", 7, "v7")
    hub.send_dashboard("t2", 8, "other")
    assert await conn.take() == ["v7"]
    assert await other_team.take() == ["other"]
    hub.unsubscribe_dashboard(conn)
    hub.send_dashboard("t1", 9, "v9")
    assert conn.queue_depth == 0
