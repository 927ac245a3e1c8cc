"""A dashboard subscriber gets the snapshot first, then every update newer
than it, even those published while the snapshot was being read; the same
after a bus reconnection, with a fresh snapshot."""

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


def subscribed(hub: Hub, conn_id: str, team_id: str = "t1") -> Connection:
    conn = Connection(None, conn_id, Principal(f"m-{conn_id}", team_id, "viewer"), max_queue=100)
    hub.subscribe_dashboard(conn)
    hub.dashboard_ready(conn, 0)
    return conn


async def test_a_bus_reconnection_holds_updates_for_a_fresh_snapshot() -> None:
    hub = Hub(MemorySessionLog())
    conn = subscribed(hub, "c1")
    other_team = subscribed(hub, "c2", "t2")
    hub.send_dashboard("t1", 3, "v3")
    assert await conn.take() == ["v3"]

    assert sorted(hub.resync_dashboards(1)) == ["t1", "t2"]
    hub.send_dashboard("t1", 6, "v6")  # already in the snapshot (version 7)
    hub.send_dashboard("t1", 8, "v8")  # newer: must follow it
    assert conn.queue_depth == 0  # nothing may overtake the snapshot
    hub.dashboard_resynced("t1", 1, (7, "snapshot-7"))
    assert await conn.take() == ["snapshot-7", "v8"]
    hub.send_dashboard("t1", 9, "v9")
    assert await conn.take() == ["v9"]

    hub.send_dashboard("t2", 4, "w4")
    hub.dashboard_resynced("t2", 1, None)  # no snapshot: what was held, as it is
    assert await other_team.take() == ["w4"]


async def test_a_subscribe_under_way_keeps_its_own_snapshot() -> None:
    """A socket still waiting for its subscribe's snapshot is not held for
    the reconnection (that snapshot is read again if it began before)."""
    hub = Hub(MemorySessionLog())
    conn = Connection(None, "c1", Principal("m1", "t1", "viewer"), max_queue=100)
    hub.subscribe_dashboard(conn)
    hub.send_dashboard("t1", 2, "v2")
    hub.resync_dashboards(1)
    hub.send_dashboard("t1", 5, "v5")
    hub.dashboard_resynced("t1", 1, (4, "snapshot-4"))
    assert conn.queue_depth == 0
    assert hub.dashboard_ready(conn, 3) == ["v5"]

    # Subscribing again while held for a reconnection: its own snapshot wins.
    hub.resync_dashboards(2)
    hub.subscribe_dashboard(conn)
    hub.send_dashboard("t1", 7, "v7")
    assert hub.dashboard_ready(conn, 6) == ["v7"]
    hub.dashboard_resynced("t1", 2, (6, "snapshot-6"))
    hub.send_dashboard("t1", 8, "v8")
    assert await conn.take() == ["v8"]


async def test_a_later_reconnection_waits_for_its_own_snapshot() -> None:
    hub = Hub(MemorySessionLog())
    conn = subscribed(hub, "c1")
    hub.resync_dashboards(1)
    hub.resync_dashboards(2)  # lost again while the first snapshot was read
    hub.send_dashboard("t1", 5, "v5")
    hub.dashboard_resynced("t1", 1, (4, "snapshot-4"))  # may predate the second loss
    assert conn.queue_depth == 0
    hub.dashboard_resynced("t1", 2, (5, "snapshot-5"))
    hub.send_dashboard("t1", 6, "v6")
    assert await conn.take() == ["snapshot-5", "v6"]


async def test_unsubscribing_while_held_sends_nothing() -> None:
    hub = Hub(MemorySessionLog())
    conn = subscribed(hub, "c1")
    hub.resync_dashboards(1)
    hub.send_dashboard("t1", 5, "v5")
    hub.unsubscribe_dashboard(conn)
    hub.dashboard_resynced("t1", 1, (5, "snapshot-5"))
    hub.send_dashboard("t1", 6, "v6")
    assert conn.queue_depth == 0
