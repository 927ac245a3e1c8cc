"""The credentials of open sockets, kept true for as long as they are open;
and those of REST requests that follow a reply (``POST
/chat/sessions/{id}/messages``, streaming it as server-sent events or waiting
for its end), the same way.

A socket authenticates once, but what it authenticated with can change while
it stays open. REST checks the key, the member and the role on every request;
a socket gets the same answers this way:

* **Expiry.** A socket authenticated with a JWT is closed with 4401 when the
  token expires, unless the client sent a fresh ``auth`` frame before then
  (:meth:`SocketCredentials.refresh`). API keys do not expire.
* **Revocation, removal, demotion.** The routes that make them announce the
  team on the bus (:meth:`SocketCredentials.changed`, after their commit);
  every instance then checks that team's sockets against the database. A
  socket whose key or member is gone is closed with 4401; a demoted one acts
  with its new role from its next frame.
* **A backstop.** An announcement can be lost (the bus is at most once; the
  database may not answer when it arrives), and a change can be made outside
  the API. So every socket is checked again at least every
  :data:`RECHECK_S`: by a sweep over this instance's sockets, listening or
  not, and before a frame that reads or changes the team's data; and every
  socket is checked at once when the bus comes back after a drop.

A REST request following a reply has a socket-less :class:`Connection`
(its sink), which :meth:`SocketCredentials.follow` watches as a socket for as
long as the request lasts: its sink is closed with 4401 for the same reasons,
and the request ends on it (:meth:`SocketCredentials.closed_reason` says why).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chathub.auth import ROLE_RANK, Principal, TokenCodec, looks_like_api_key
from chathub.errors import Forbidden, Unauthorized
from chathub.server.bus import Bus
from chathub.server.connection import CLOSE_UNAUTHORIZED, Connection
from chathub.server.hub import Hub
from chathub.storage.models import utcnow
from chathub.storage.repositories import teams

log = logging.getLogger("chathub.credentials")

CHANNEL = "credentials"
RECHECK_S = 60.0
"""How old a socket's last check may be before a frame checks it again."""
REVOKED = "credentials revoked"
EXPIRED = "token expired"

# last_used_at is kept to this resolution, so that using a key is not a write
# on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


async def authenticate(tokens: TokenCodec, db: AsyncSession, token: str) -> Principal:
    """A principal from a JWT or an API key, checked now against the
    database: the member, their role and the key (the one given, or the one
    the JWT was issued for) must still be live; the role is the lowest of
    the member's, the key's and the token's."""
    if looks_like_api_key(token):
        found = await teams.find_active_key(db, token)
        if found is None:
            raise Unauthorized("unknown or revoked API key")
        key, member = found
        now = utcnow()
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            await teams.touch_api_key(db, key.id)
        return Principal(
            member_id=member.id,
            team_id=member.team_id,
            role=min(key.role, member.role, key=ROLE_RANK.__getitem__),
            api_key_id=key.id,
        )
    principal = tokens.verify(token)
    # A token lives for its TTL; the member, their role and the key it was
    # issued for are checked now, so removal, demotion and revocation bite at once.
    role = await teams.current_role(
        db,
        team_id=principal.team_id,
        member_id=principal.member_id,
        api_key_id=principal.api_key_id,
    )
    if role is None:
        raise Unauthorized("the member or the key this token was issued for is gone")
    if ROLE_RANK[role] < ROLE_RANK[principal.role]:
        principal = replace(principal, role=role)
    return principal


class SocketCredentials:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        bus: Bus,
        hub: Hub,
        tokens: TokenCodec,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.bus = bus
        self.hub = hub
        self.tokens = tokens
        self._unsubscribe = bus.subscribe(CHANNEL, self._on_changed)
        self._unregister = bus.on_reconnect(self._recheck_everyone)
        self._sweeper: asyncio.Task[None] | None = None
        # The sinks of REST requests that follow a reply, by team; and why
        # those closed for their credentials were closed.
        self._sinks: defaultdict[str, set[Connection]] = defaultdict(set)
        self._sink_closed: dict[Connection, str] = {}

    def start(self) -> None:
        """Start the sweep that checks every socket again each
        :data:`RECHECK_S`."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S / 2)
            await self._recheck_everyone(checked_before=time.monotonic() - RECHECK_S)

    async def _recheck_everyone(self, checked_before: float | None = None) -> None:
        """Check this instance's sockets (those last checked before
        ``checked_before``, or all), team by team; a team whose check fails
        (the database did not answer) is tried again at the next sweep."""
        for team_id in {*self.hub.team_ids(), *self._sinks}:
            conns = [
                c
                for c in self._team_connections(team_id)
                if checked_before is None or c.checked_at <= checked_before
            ]
            try:
                for conn in await self._recheck(team_id, conns):
                    self._close(conn, REVOKED)
            except Exception as exc:
                log.warning("could not check the sockets of team %s: %r", team_id, exc)

    # -- a socket's life ----------------------------------------------------

    def watch(self, conn: Connection) -> None:
        """Start following ``conn``, just authenticated: close it when its
        token expires."""
        conn.checked_at = time.monotonic()
        self._arm_expiry(conn)

    def forget(self, conn: Connection) -> None:
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

    def follow(self, sink: Connection) -> None:
        """Watch the socket-less ``sink`` of a REST request, just
        authenticated, as a socket until :meth:`unfollow`: it is closed
        (4401) when its key or member is gone or its token expires."""
        self._sinks[sink.principal.team_id].add(sink)
        self.watch(sink)

    def unfollow(self, sink: Connection) -> None:
        """Stop watching ``sink``; idempotent."""
        self.forget(sink)
        self._sink_closed.pop(sink, None)
        team_id = sink.principal.team_id
        sinks = self._sinks.get(team_id)
        if sinks is not None:
            sinks.discard(sink)
            if not sinks:
                del self._sinks[team_id]

    def closed_reason(self, sink: Connection) -> str | None:
        """Why the followed ``sink`` was closed for its credentials
        (:data:`REVOKED` or :data:`EXPIRED`), or None when it was not."""
        return self._sink_closed.get(sink)

    def followed(self, team_id: str) -> list[Connection]:
        """The sinks of ``team_id`` followed here."""
        return list(self._sinks.get(team_id, ()))

    def _team_connections(self, team_id: str) -> list[Connection]:
        """The team's sockets registered here, and its followed sinks."""
        return [*self.hub.team_connections(team_id), *self.followed(team_id)]

    def _close(self, conn: Connection, reason: str) -> None:
        """Close ``conn`` with 4401 (a followed sink keeps the reason)."""
        if conn.closed:
            return
        if conn in self._sinks.get(conn.principal.team_id, ()):
            self._sink_closed[conn] = reason
        conn.close_soon(CLOSE_UNAUTHORIZED, reason)

    async def refresh(self, conn: Connection, token: str) -> Principal:
        """An ``auth`` frame on an open socket: a fresh token for the same
        member replaces the socket's credentials (and their expiry). A bad
        token raises Unauthorized and leaves the socket as it was."""
        async with self.sessionmaker() as db, db.begin():
            principal = await authenticate(self.tokens, db, token)
        current = conn.principal
        if (principal.team_id, principal.member_id) != (current.team_id, current.member_id):
            raise Forbidden("this token is for another member; open a socket of its own")
        conn.principal = principal
        conn.checked_at = time.monotonic()
        self._arm_expiry(conn)
        return principal

    async def check(self, conn: Connection) -> None:
        """Before a frame that reads or changes the team's data. Raises
        Unauthorized when the socket's credentials are gone; the socket is
        closed (4401) right after the frame's error answer is queued."""
        reason = None
        if time.monotonic() - conn.checked_at >= RECHECK_S and await self._recheck(
            conn.principal.team_id, [conn]
        ):
            reason = REVOKED
        expires_at = conn.principal.expires_at
        if expires_at is not None and time.time() >= expires_at:
            reason = EXPIRED
        if reason is not None:
            # The caller queues the error answer without awaiting; this runs next.
            asyncio.get_running_loop().call_soon(conn.close_soon, CLOSE_UNAUTHORIZED, reason)
            raise Unauthorized(f"this socket's credentials are no longer valid: {reason}")

    # -- changes ------------------------------------------------------------

    async def changed(self, team_id: str) -> None:
        """A member, role or key of ``team_id`` changed (and is committed):
        every instance checks that team's sockets. A failure to announce is
        logged; the backstop check catches up."""
        try:
            await self.bus.publish(CHANNEL, {"team_id": team_id})
        except Exception as exc:
            log.warning("could not announce a credentials change of team %s: %r", team_id, exc)

    async def _on_changed(self, message: dict[str, Any]) -> None:
        team_id = message.get("team_id")
        if isinstance(team_id, str):
            for conn in await self._recheck(team_id, self._team_connections(team_id)):
                self._close(conn, REVOKED)

    async def _recheck(self, team_id: str, conns: Iterable[Connection]) -> list[Connection]:
        """Check each socket's member and key (once per distinct pair); a
        demoted one takes its new role. Returns those whose member or key is
        gone, for the caller to close."""
        by_credential: dict[tuple[str, str | None], list[Connection]] = {}
        for conn in conns:
            p = conn.principal
            by_credential.setdefault((p.member_id, p.api_key_id), []).append(conn)
        if not by_credential:
            return []
        async with self.sessionmaker() as db:
            roles = await teams.current_roles(db, team_id=team_id, credentials=by_credential)
        now = time.monotonic()
        gone = []
        for credential, group in by_credential.items():
            role = roles[credential]
            for conn in group:
                conn.checked_at = now
                if role is None:
                    gone.append(conn)
                elif ROLE_RANK[role] < ROLE_RANK[conn.principal.role]:
                    conn.principal = replace(conn.principal, role=role)
        return gone

    # -- expiry ---------------------------------------------------------------

    def _arm_expiry(self, conn: Connection) -> None:
        self.forget(conn)
        expires_at = conn.principal.expires_at
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at - time.time())
        conn.expiry = loop.call_at(loop.time() + delay, self._expire, conn, expires_at)

    def _expire(self, conn: Connection, expires_at: float) -> None:
        # A refresh since this was armed moved the expiry: nothing to do.
        if conn.principal.expires_at == expires_at:
            self._close(conn, EXPIRED)

    def close(self) -> None:
        self._unsubscribe()
        self._unregister()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in self.hub.connections.values():
            self.forget(conn)
        for sinks in self._sinks.values():
            for sink in sinks:
                self.forget(sink)
