"""``POST /auth/token``: exchange an API key for a short-lived JWT."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from chathub.errors import Unauthorized
from chathub.handlers.deps import SessionDep, StateDep, authenticate
from chathub.handlers.schemas import StrictBody, errors

router = APIRouter(tags=["auth"])


class TokenRequest(StrictBody):
    api_key: str = Field(min_length=1, max_length=256)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


@router.post("/auth/token", responses=errors())
async def issue_token(body: TokenRequest, state: StateDep, db: SessionDep) -> TokenResponse:
    """A JWT carrying the key's member, team and role. Only API keys are
    accepted here: a JWT cannot extend itself."""
    if not body.api_key.startswith("chk_"):
        raise Unauthorized("not an API key")
    principal = await authenticate(state, db, body.api_key)
    return TokenResponse(access_token=state.tokens.issue(principal), expires_in=state.tokens.ttl_s)
