"""A refused token is answered in our words: REST's 401 and the socket's
4401 say ``invalid token``, not PyJWT's account of what it could not parse
or check (which goes to the debug log)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.handlers.test_auth import claims_for
from tests.harness import JWT_SECRET, RunningServer, TeamFixture

pytestmark = pytest.mark.timeout(60)


def claims_of(team: TeamFixture, **changes: Any) -> dict[str, Any]:
    """Claims as chathub issues them for the team's owner and key."""
    return claims_for(team.owner, kid=team.owner.api_key_id, **changes)


def bad_tokens(team: TeamFixture) -> dict[str, tuple[str, str]]:
    """Refused tokens, each with (a part of) what PyJWT says of it."""
    good = claims_of(team)
    return {
        "garbage": ("abc.def.ghi", "Invalid header"),
        "alg none": (jwt.encode(good, None, algorithm="none"), "alg value is not allowed"),
        "HS512": (
            jwt.encode(good, JWT_SECRET * 2, algorithm="HS512"),  # long enough for HS512
            "alg value is not allowed",
        ),
        "other secret": (
            jwt.encode(good, "another-secret-" + "y" * 32, algorithm="HS256"),
            "Signature verification failed",
        ),
        "other audience": (
            jwt.encode(claims_of(team, aud="someone-else"), JWT_SECRET, algorithm="HS256"),
            "Audience",
        ),
        "no subject": (
            jwt.encode(claims_of(team, sub=None), JWT_SECRET, algorithm="HS256"),
            '"sub"',
        ),
    }


async def test_a_refused_token_gets_a_401_in_our_words_and_pyjwts_at_debug(
    client: httpx.AsyncClient, team: TeamFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="chathub.auth")
    for name, (token, pyjwt_says) in bad_tokens(team).items():
        caplog.clear()
        r = await client.get("/chat/sessions", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (name, r.text)
        body = r.json()
        assert body["code"] == "unauthorized" and body["detail"] == "invalid token", (name, body)
        assert pyjwt_says not in r.text, name
        logged = [rec.getMessage() for rec in caplog.records if rec.name == "chathub.auth"]
        assert any(pyjwt_says in line for line in logged), (name, logged)
    # An expired token still says so: the client knows to get a new one.
    expired = claims_of(team, iat=int(time.time()) - 120, exp=int(time.time()) - 60)
    r = await client.get(
        "/chat/sessions",
        headers={"Authorization": f"Bearer {jwt.encode(expired, JWT_SECRET, algorithm='HS256')}"},
    )
    assert r.status_code == 401 and r.json()["detail"] == "token expired", r.text


@pytest.mark.parametrize("by_frame", [False, True], ids=["header", "auth frame"])
async def test_a_socket_refused_for_its_token_closes_with_our_words(
    clean_server: RunningServer, team: TeamFixture, by_frame: bool
) -> None:
    token, _ = bad_tokens(team)["alg none"]
    headers = {} if by_frame else {"Authorization": f"Bearer {token}"}
    async with websockets.connect(clean_server.ws_url, additional_headers=headers) as conn:
        if by_frame:
            await conn.send(json.dumps({"type": "auth", "token": token}))
        with pytest.raises(ConnectionClosed):
            while True:
                await conn.recv()
        assert (conn.close_code, conn.close_reason) == (4401, "invalid token")
