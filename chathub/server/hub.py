"""The hub: which sockets are joined to which sessions, and fan-out.

The session log calls :meth:`Hub.on_event` once per event; the hub queues the
event's pre-encoded frame on each joined socket. A socket that joins with
``after_seq`` (or sees a gap) reads what it missed from the log first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from chathub.server import metrics
from chathub.server.connection import CLOSE_RESTART, Connection, SessionCursor
from chathub.server.frames import encode
from chathub.server.session_log import Event, SessionLog

log = logging.getLogger("chathub.hub")


class Hub:
    def __init__(self, session_log: SessionLog) -> None:
        self.log = session_log
        self.connections: dict[str, Connection] = {}
        self._by_session: defaultdict[str, set[Connection]] = defaultdict(set)
        self._by_team: defaultdict[str, set[Connection]] = defaultdict(set)
        self._by_team_dashboard: defaultdict[str, set[Connection]] = defaultdict(set)
        self._by_team_sessions: defaultdict[str, set[Connection]] = defaultdict(set)
        # Subscribers held for a fresh snapshot after a bus reconnection, and
        # the number of that reconnection (see resync_dashboards).
        self._dashboard_stale: dict[Connection, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Each member's sockets here, from authentication (before the
        # welcome, so sockets authenticating at once cannot all pass the
        # cap) until they end: see admit.
        self._member_slots: dict[str, int] = {}
        session_log.add_listener(self.on_event)

    # -- connections -------------------------------------------------------

    def admit(self, member_id: str, cap: int) -> bool:
        """Take one of ``member_id``'s ``cap`` socket slots on this instance
        (``cap`` 0: no cap); False, taking none, when all are in use. A
        socket admitted gives its slot back with :meth:`release` as it ends."""
        held = self._member_slots.get(member_id, 0)
        if cap and held >= cap:
            return False
        self._member_slots[member_id] = held + 1
        return True

    def release(self, member_id: str) -> None:
        """Give back a slot :meth:`admit` took."""
        held = self._member_slots.pop(member_id, 0) - 1
        if held > 0:
            self._member_slots[member_id] = held

    def register(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        self._by_team[conn.principal.team_id].add(conn)
        metrics.OPEN_SOCKETS.inc()

    def unregister(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        metrics.OPEN_SOCKETS.dec()
        team = self._by_team.get(conn.principal.team_id)
        if team is not None:
            team.discard(conn)
            if not team:
                del self._by_team[conn.principal.team_id]
        for session_id in list(conn.sessions):
            self.leave(conn, session_id)
        self.unsubscribe_dashboard(conn)
        self.unsubscribe_sessions(conn)

    def team_ids(self) -> list[str]:
        """The teams with a registered socket here."""
        return list(self._by_team)

    def team_connections(self, team_id: str) -> list[Connection]:
        """The registered sockets of ``team_id``."""
        return list(self._by_team.get(team_id, ()))

    # -- sessions ----------------------------------------------------------

    async def join(
        self, conn: Connection, session_id: str, after_seq: int | None
    ) -> dict[str, Any]:
        """Subscribe ``conn``; returns the ack fields. With ``after_seq`` the
        missed events are queued first, then live ones, with no gap."""
        last = await self.log.last_seq(session_id)
        if after_seq is None:
            self._join_live(conn, session_id, last)
            return {"session_id": session_id, "last_seq": last}
        missed = await self.log.read_after(session_id, after_seq)
        if missed is None:
            metrics.RESUMES.labels(recovered="false").inc()
            # Go on live from now; the client reloads the history over REST.
            last = await self.log.last_seq(session_id)
            self._join_live(conn, session_id, last)
            return {"session_id": session_id, "last_seq": last, "recovered": False}
        metrics.RESUMES.labels(recovered="true").inc()
        cursor = SessionCursor(last_seq=after_seq, catching_up=True)
        conn.sessions[session_id] = cursor
        self._by_session[session_id].add(conn)
        ack = {"session_id": session_id, "last_seq": last, "recovered": True}
        self._spawn(self._catch_up(conn, session_id, missed))
        return ack

    def _join_live(self, conn: Connection, session_id: str, last: int) -> None:
        conn.sessions[session_id] = SessionCursor(last_seq=last)
        self._by_session[session_id].add(conn)
        # An event appended while ``last`` was being read went out before this
        # socket was listed; the log still has it.
        self.catch_up(conn, session_id)

    def leave(self, conn: Connection, session_id: str) -> bool:
        if conn.sessions.pop(session_id, None) is None:
            return False
        members = self._by_session.get(session_id)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._by_session[session_id]
        return True

    def on_event(self, event: Event) -> None:
        for conn in tuple(self._by_session.get(event.session_id, ())):
            conn.deliver(event, self.catch_up)

    def catch_up(self, conn: Connection, session_id: str) -> None:
        cursor = conn.sessions.get(session_id)
        if cursor is None or cursor.catching_up:
            return
        cursor.catching_up = True
        self._spawn(self._catch_up(conn, session_id, None))

    async def _catch_up(self, conn: Connection, session_id: str, first: list[Event] | None) -> None:
        """Queue events from the log until the socket is level with it. Live
        events are ignored meanwhile; they are read here instead."""
        cursor = conn.sessions.get(session_id)
        if cursor is None:
            return
        batch = first
        try:
            while not conn.closed and conn.sessions.get(session_id) is cursor:
                if batch is None:
                    batch = await self.log.read_after(session_id, cursor.last_seq)
                    if batch is None:
                        # The window moved past us while catching up.
                        last = await self.log.last_seq(session_id)
                        conn.send(_encode_lost(session_id, cursor.last_seq, last))
                        cursor.last_seq = last
                        break
                if not batch:
                    break
                for event in batch:
                    if event.seq == cursor.last_seq + 1:
                        cursor.last_seq = event.seq
                        conn.send(event.frame)
                batch = None
        finally:
            cursor.catching_up = False
        if conn.closed or conn.sessions.get(session_id) is not cursor:
            return
        # A live event that arrived while the last read was in flight was
        # dropped by ``deliver`` (we were catching up) and need not be in
        # what that read returned. Live delivery is back on: read once more.
        for event in await self.log.read_after(session_id, cursor.last_seq) or ():
            conn.deliver(event, self.catch_up)

    # -- dashboard ---------------------------------------------------------

    def subscribe_dashboard(self, conn: Connection) -> None:
        """Subscribe, holding updates back until :meth:`dashboard_ready`
        (the snapshot is read meanwhile, and must reach the client first)."""
        conn.dashboard = True
        conn.dashboard_held = []
        # This snapshot is read after any earlier reconnection: it will do.
        self._dashboard_stale.pop(conn, None)
        self._by_team_dashboard[conn.principal.team_id].add(conn)

    def dashboard_ready(self, conn: Connection, snapshot_version: int) -> list[str]:
        """The held updates newer than the snapshot; live updates go straight
        to the socket from now on."""
        held, conn.dashboard_held = conn.dashboard_held or [], None
        return [frame for version, frame in held if version > snapshot_version]

    def unsubscribe_dashboard(self, conn: Connection) -> None:
        conn.dashboard = False
        if self._dashboard_stale.pop(conn, None) is not None:
            conn.dashboard_held = None
        members = self._by_team_dashboard.get(conn.principal.team_id)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._by_team_dashboard[conn.principal.team_id]

    def send_dashboard(self, team_id: str, version: int, frame: str) -> None:
        for conn in tuple(self._by_team_dashboard.get(team_id, ())):
            if conn.dashboard_held is not None:
                conn.dashboard_held.append((version, frame))
            else:
                conn.send(frame)

    def resync_dashboards(self, reconnection: int) -> list[str]:
        """The bus lost updates (its subscription dropped; this is its
        ``reconnection``-th return): hold every subscriber's updates until
        :meth:`dashboard_resynced` brings its team's fresh snapshot. Returns
        the teams to read one for.

        A socket still waiting for the snapshot of its own ``subscribe`` is
        left alone: that snapshot is read again when a reconnection happened
        during its read (``Dashboards.snapshot``)."""
        for members in self._by_team_dashboard.values():
            for conn in members:
                if conn.dashboard_held is None:
                    conn.dashboard_held = []
                elif conn not in self._dashboard_stale:
                    continue
                self._dashboard_stale[conn] = reconnection
        return list(self._by_team_dashboard)

    def dashboard_resynced(
        self, team_id: str, reconnection: int, snapshot: tuple[int, str] | None
    ) -> None:
        """Send the team's subscribers held for ``reconnection`` (or an
        earlier one) its ``snapshot`` (version, frame), then the held
        updates newer than it. ``None``: the snapshot could not be read; the
        held updates go out as they are."""
        for conn in tuple(self._by_team_dashboard.get(team_id, ())):
            held_for = self._dashboard_stale.get(conn)
            if held_for is None or held_for > reconnection:
                continue  # subscribed since, or held for a later reconnection
            del self._dashboard_stale[conn]
            held, conn.dashboard_held = conn.dashboard_held or [], None
            if snapshot is None:
                frames = [frame for _, frame in held]
            else:
                version, first = snapshot
                frames = [first, *(frame for v, frame in held if v > version)]
            for frame in frames:
                conn.send(frame)

    # -- the team's session list (chathub.server.session_feed) -------------

    def subscribe_sessions(self, conn: Connection) -> None:
        self._by_team_sessions[conn.principal.team_id].add(conn)

    def unsubscribe_sessions(self, conn: Connection) -> None:
        members = self._by_team_sessions.get(conn.principal.team_id)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._by_team_sessions[conn.principal.team_id]

    def send_sessions(self, team_id: str, frame: str) -> None:
        for conn in tuple(self._by_team_sessions.get(team_id, ())):
            conn.send(frame)

    def send_sessions_everywhere(self, frame: str) -> None:
        for members in tuple(self._by_team_sessions.values()):
            for conn in tuple(members):
                conn.send(frame)

    # -- lifecycle ---------------------------------------------------------

    def start_heartbeats(self, every_s: float) -> None:
        """One timer for every socket (not a task per socket: idle sockets
        are what a hub holds most of)."""
        self._spawn(self._heartbeats(every_s))

    async def _heartbeats(self, every_s: float) -> None:
        frame = encode({"type": "heartbeat"})
        while True:
            await asyncio.sleep(every_s)
            # Kept current without a scrape too: under ``--workers`` a scrape
            # reads the figure every worker last recorded.
            self.record_queue_depth()
            for conn in tuple(self.connections.values()):
                conn.send(frame)

    def record_queue_depth(self) -> None:
        """Set the send-queue gauge to the frames queued on this instance."""
        metrics.SEND_QUEUE_DEPTH.set(sum(c.queue_depth for c in self.connections.values()))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, code: int = CLOSE_RESTART) -> None:
        for conn in list(self.connections.values()):
            await conn.drain_and_stop(timeout=1.0)
            conn.close_soon(code, "server shutting down")
        for task in list(self._tasks):
            task.cancel()


def _encode_lost(session_id: str, from_seq: int, to_seq: int) -> str:
    return encode(
        {
            "type": "resync",
            "session_id": session_id,
            "recovered": False,
            "after_seq": from_seq,
            "last_seq": to_seq,
        }
    )
