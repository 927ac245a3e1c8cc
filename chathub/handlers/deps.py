"""Request dependencies, as ``Annotated`` aliases used by every route."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from chathub import logs
from chathub.auth import Principal
from chathub.errors import Forbidden, Unauthorized
from chathub.server import credentials
from chathub.server.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.state.chathub
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_db(state: StateDep) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed when the route returns,
    rolled back when it raises."""
    async with state.sessionmaker() as session, session.begin():
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_db, scope="function")]


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return token.strip()


async def authenticate(state: AppState, db: AsyncSession, token: str) -> Principal:
    """A principal from a JWT or an API key; the member must still exist."""
    return await credentials.authenticate(state.tokens, db, token)


async def current_principal(
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """Authenticates in a short transaction of its own, so that the route's
    transaction (or a route with none, like a streaming one) never waits on it."""
    token = bearer_token(authorization)
    async with state.sessionmaker() as db, db.begin():
        principal = await authenticate(state, db, token)
    logs.bind(team=principal.team_id)
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def require(minimum: str) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: CurrentUser) -> Principal:
        if not principal.has_role(minimum):
            raise Forbidden(f"this needs the {minimum} role or higher")
        return principal

    return check


Viewer = CurrentUser
MemberUser = Annotated[Principal, Depends(require("member"))]
AdminUser = Annotated[Principal, Depends(require("admin"))]
OwnerUser = Annotated[Principal, Depends(require("owner"))]


class PageParams:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=100, description="page size")] = 20,
        cursor: Annotated[
            str | None, Query(max_length=512, description="opaque cursor from next_cursor")
        ] = None,
    ) -> None:
        self.limit = limit
        self.cursor = cursor


PageDep = Annotated[PageParams, Depends()]
