"""Credentials: ``POST /auth/token``, JWTs and API keys on every route, the RS256
configuration, and the refusal to run a shared database with a default secret."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chathub.config import ConfigError, Settings
from chathub.server.app import create_app
from tests.harness import (
    JWT_SECRET,
    Actor,
    TeamFixture,
    http_client,
    make_team,
    pg_url,
    start_server,
    test_settings,
)

WRONG_SECRET = "not-the-secret-" + "y" * 32


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def claims_for(actor: Actor, **changes: Any) -> dict[str, Any]:
    """Claims as chathub issues them for ``actor``; a change to ``None`` drops a claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": actor.member_id,
        "team_id": actor.team_id,
        "role": actor.role,
        "iat": now,
        "exp": now + 600,
        "aud": "chathub",
        "iss": "chathub",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def hs256(claims: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def hand_signed(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, for headers and keys PyJWT refuses to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def assert_unauthorized(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "unauthorized" and body["status"] == 401
    assert r.headers["www-authenticate"] == "Bearer"


async def exchange(client: httpx.AsyncClient, api_key: str) -> str:
    r = await client.post("/auth/token", json={"api_key": api_key})
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


# ---- the exchange --------------------------------------------------------------------


async def test_api_key_exchanges_for_a_working_jwt(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    r = await client.post("/auth/token", json={"api_key": team.owner.api_key})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    token = body["access_token"]

    claims = jwt.decode(
        token, JWT_SECRET, algorithms=["HS256"], audience="chathub", issuer="chathub"
    )
    assert claims["sub"] == team.owner.member_id
    assert claims["team_id"] == team.team_id
    assert claims["role"] == "owner"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(token)["alg"] == "HS256"

    created = await client.post("/chat/sessions", json={"title": "by jwt"}, headers=bearer(token))
    assert created.status_code == 201
    assert created.json()["created_by"] == team.owner.member_id
    members = await client.get("/team/members", headers=bearer(token))
    assert members.status_code == 200


async def test_jwt_carries_the_keys_role(client: httpx.AsyncClient, team: TeamFixture) -> None:
    viewer = await team.actor("viewer")
    token = await exchange(client, viewer.api_key)
    assert jwt.decode(token, options={"verify_signature": False})["role"] == "viewer"
    assert (await client.get("/chat/sessions", headers=bearer(token))).status_code == 200
    r = await client.post("/chat/sessions", json={}, headers=bearer(token))
    assert r.status_code == 403 and r.json()["code"] == "forbidden"


async def test_a_correctly_made_token_is_accepted(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    """The control for the refusals below: each differs from this in one point."""
    r = await client.get("/chat/sessions", headers=bearer(hs256(claims_for(team.owner))))
    assert r.status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"api_key": ""}, {"api_key": 5}, {"api_key": "chk_x", "ttl": 99999}, [], "chk_x"],
)
async def test_token_request_bad_body_is_400(client: httpx.AsyncClient, body: object) -> None:
    r = await client.post("/auth/token", json=body)
    assert r.status_code == 400 and r.json()["code"] == "bad_request"


# ---- refusals ------------------------------------------------------------------------

Credentials = Callable[[httpx.AsyncClient, TeamFixture, TeamFixture], Awaitable[dict[str, str]]]


def static(headers: Callable[[Actor], dict[str, str]]) -> Credentials:
    async def make(
        _client: httpx.AsyncClient, team: TeamFixture, _other: TeamFixture
    ) -> dict[str, str]:
        return headers(team.owner)

    return make


async def revoked_key(
    client: httpx.AsyncClient, team: TeamFixture, _other: TeamFixture
) -> dict[str, str]:
    r = await client.post("/team/api-keys", json={"name": "soon gone"}, headers=team.owner.headers)
    created = r.json()
    gone = await client.delete(f"/team/api-keys/{created['id']}", headers=team.owner.headers)
    assert gone.status_code == 204
    return bearer(created["api_key"])


async def revoked_keys_jwt(
    client: httpx.AsyncClient, team: TeamFixture, _other: TeamFixture
) -> dict[str, str]:
    r = await client.post("/team/api-keys", json={"name": "soon gone"}, headers=team.owner.headers)
    created = r.json()
    token = await exchange(client, created["api_key"])
    assert (await client.get("/team/members", headers=bearer(token))).status_code == 200
    gone = await client.delete(f"/team/api-keys/{created['id']}", headers=team.owner.headers)
    assert gone.status_code == 204
    return bearer(token)


async def _removed_admin(client: httpx.AsyncClient, team: TeamFixture) -> tuple[Actor, str]:
    admin = await team.actor("admin")
    token = await exchange(client, admin.api_key)
    assert (await client.get("/team/members", headers=bearer(token))).status_code == 200
    r = await client.delete(f"/team/members/{admin.member_id}", headers=team.owner.headers)
    assert r.status_code == 204
    return admin, token


async def removed_members_key(
    client: httpx.AsyncClient, team: TeamFixture, _other: TeamFixture
) -> dict[str, str]:
    admin, _ = await _removed_admin(client, team)
    return admin.headers


async def removed_members_jwt(
    client: httpx.AsyncClient, team: TeamFixture, _other: TeamFixture
) -> dict[str, str]:
    _, token = await _removed_admin(client, team)
    return bearer(token)


async def member_in_the_wrong_team(
    _client: httpx.AsyncClient, team: TeamFixture, other: TeamFixture
) -> dict[str, str]:
    # well signed, but naming a team the member does not belong to
    return bearer(hs256(claims_for(team.owner, team_id=other.team_id)))


async def outsider_in_this_team(
    _client: httpx.AsyncClient, _team: TeamFixture, other: TeamFixture
) -> dict[str, str]:
    return bearer(hs256(claims_for(other.owner, team_id=_team.team_id)))


REFUSED: dict[str, Credentials] = {
    "forged signature": static(lambda a: bearer(hs256(claims_for(a), WRONG_SECRET))),
    "expired": static(
        lambda a: bearer(
            hs256(claims_for(a, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))
        )
    ),
    "wrong audience": static(lambda a: bearer(hs256(claims_for(a, aud="someone-else")))),
    "wrong issuer": static(lambda a: bearer(hs256(claims_for(a, iss="evil")))),
    "missing exp": static(lambda a: bearer(hs256(claims_for(a, exp=None)))),
    "missing sub": static(lambda a: bearer(hs256(claims_for(a, sub=None)))),
    "unknown role": static(lambda a: bearer(hs256(claims_for(a, role="root")))),
    "unknown member": static(lambda a: bearer(hs256(claims_for(a, sub="nobody")))),
    "alg none": static(lambda a: bearer(hand_signed({"alg": "none"}, claims_for(a), None))),
    "alg None, capitalised": static(
        lambda a: bearer(hand_signed({"alg": "None", "typ": "JWT"}, claims_for(a), None))
    ),
    "garbage": static(lambda a: bearer("this.is.not-a-jwt")),
    "bearer without a token": static(lambda a: {"Authorization": "Bearer"}),
    "basic scheme": static(
        lambda a: {"Authorization": "Basic " + b64url(f"{a.member_id}:{a.api_key}".encode())}
    ),
    "key without scheme": static(lambda a: {"Authorization": a.api_key}),
    "missing header": static(lambda a: {}),
    "unknown api key": static(lambda a: bearer(a.api_key[:-4] + "AAAA")),
    "revoked key": revoked_key,
    "jwt of a revoked key": revoked_keys_jwt,
    "removed member's key": removed_members_key,
    "removed member's jwt": removed_members_jwt,
    "member named in the wrong team": member_in_the_wrong_team,
    "outsider named in this team": outsider_in_this_team,
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_bad_credentials_are_401_and_write_nothing(
    client: httpx.AsyncClient, team: TeamFixture, other_team: TeamFixture, case: str
) -> None:
    headers = await REFUSED[case](client, team, other_team)
    owner = team.owner.headers
    members_before = (await client.get("/team/members", headers=owner)).json()

    assert_unauthorized(await client.get("/chat/sessions", headers=headers))
    assert_unauthorized(await client.get("/team/members", headers=headers))
    assert_unauthorized(
        await client.post("/chat/sessions", json={"title": "intruder"}, headers=headers)
    )
    assert_unauthorized(
        await client.post(
            "/team/members", json={"email": "in@example.com", "role": "owner"}, headers=headers
        )
    )
    assert_unauthorized(
        await client.delete(f"/team/members/{team.owner.member_id}", headers=headers)
    )

    assert (await client.get("/chat/sessions", headers=owner)).json()["items"] == []
    assert (await client.get("/team/members", headers=owner)).json() == members_before


@pytest.mark.parametrize("case", ["revoked key", "removed member's key", "unknown api key"])
async def test_token_exchange_refuses_dead_credentials(
    client: httpx.AsyncClient, team: TeamFixture, other_team: TeamFixture, case: str
) -> None:
    headers = await REFUSED[case](client, team, other_team)
    secret = headers["Authorization"].removeprefix("Bearer ")
    assert_unauthorized(await client.post("/auth/token", json={"api_key": secret}))


async def test_a_jwt_cannot_be_exchanged_for_another(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    token = await exchange(client, team.owner.api_key)
    r = await client.post("/auth/token", json={"api_key": token})
    # 400 when it is longer than any API key, else 401: either way, no token
    assert r.status_code in (400, 401), r.text
    assert r.json()["code"] in ("bad_request", "unauthorized")


# ---- RS256 ---------------------------------------------------------------------------


def write_rsa_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


async def test_rs256_tokens_round_trip_and_hs256_is_refused(tmp_path: Path) -> None:
    private, public = write_rsa_keypair(tmp_path, "signing")
    stranger_private, _ = write_rsa_keypair(tmp_path, "stranger")
    settings = test_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'rs256.db'}",
        tmp_path,
        jwt_algorithm="RS256",
        jwt_private_key_file=private,
        jwt_public_key_file=public,
    )
    server = await start_server(settings)
    try:
        team = await make_team(server.state, "Keyholders")
        async with http_client(server) as client:
            token = await exchange(client, team.owner.api_key)
            assert jwt.get_unverified_header(token)["alg"] == "RS256"
            claims = jwt.decode(
                token,
                public.read_text(),
                algorithms=["RS256"],
                audience="chathub",
                issuer="chathub",
            )
            assert claims["sub"] == team.owner.member_id and claims["role"] == "owner"
            assert (await client.get("/team/members", headers=bearer(token))).status_code == 200

            good = claims_for(team.owner)
            refused = {
                "HS256 with the shared test secret": hs256(good),
                # the classic confusion: the public key used as an HMAC secret
                "HS256 keyed with the public key": hand_signed(
                    {"alg": "HS256", "typ": "JWT"}, good, public.read_bytes()
                ),
                "RS256 from another key": jwt.encode(
                    good, stranger_private.read_text(), algorithm="RS256"
                ),
                "alg none": hand_signed({"alg": "none"}, good, None),
            }
            for name, forged in refused.items():
                r = await client.get("/team/members", headers=bearer(forged))
                assert r.status_code == 401, name
                assert r.json()["code"] == "unauthorized", name
            # a correctly signed RS256 token made outside the server is accepted
            ours = jwt.encode(good, private.read_text(), algorithm="RS256")
            assert (await client.get("/team/members", headers=bearer(ours))).status_code == 200
    finally:
        await server.stop()


def test_rs256_without_key_files_is_a_config_error(tmp_path: Path) -> None:
    settings = test_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path, jwt_algorithm="RS256"
    )
    with pytest.raises(ConfigError, match="CHATHUB_JWT_PRIVATE_KEY_FILE"):
        create_app(settings)


# ---- refusing to run a shared database on a default secret ---------------------------


@pytest.mark.parametrize("secret", [None, "change-me", "", "x" * 31])
def test_postgres_without_a_real_secret_is_a_config_error(
    tmp_path: Path, secret: str | None
) -> None:
    settings = test_settings(pg_url("chathub_unused"), tmp_path, jwt_secret=secret)
    with pytest.raises(ConfigError, match="CHATHUB_JWT_SECRET"):
        create_app(settings)


def test_embedded_default_keeps_its_own_random_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=None, jwt_secret=None, llm="scripted://")
    create_app(settings)
    secret_file = tmp_path / "jwt-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32 and secret != "change-me"
    create_app(settings)
    assert secret_file.read_text().strip() == secret  # kept across restarts


def _clean_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATHUB_")}
    return base | env


@pytest.mark.parametrize("secret", [None, "change-me"])
async def test_serve_refuses_postgres_with_a_default_secret(
    tmp_path: Path, secret: str | None
) -> None:
    env = _clean_env(CHATHUB_DATABASE_URL=pg_url("chathub_unused"), CHATHUB_DATA_DIR=str(tmp_path))
    if secret is not None:
        env["CHATHUB_JWT_SECRET"] = secret
    chathub = Path(sys.executable).parent / "chathub"
    proc = await asyncio.create_subprocess_exec(
        str(chathub),
        "serve",
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("chathub serve started serving instead of refusing the settings")
    assert proc.returncode not in (0, None)
    message = stderr.decode()
    assert "CHATHUB_JWT_SECRET" in message, message
    assert "Traceback" not in message
    assert "Uvicorn running" not in stdout.decode() + message


async def test_a_demoted_members_jwt_loses_the_role_at_once(
    client: httpx.AsyncClient, team: TeamFixture
) -> None:
    admin = await team.actor("admin")
    token = await exchange(client, admin.api_key)
    assert (await client.get("/team/api-keys", headers=bearer(token))).status_code == 200
    r = await client.patch(
        f"/team/members/{admin.member_id}", json={"role": "viewer"}, headers=team.owner.headers
    )
    assert r.status_code == 200
    # the token still says admin, but the member is a viewer now
    assert (await client.get("/team/api-keys", headers=bearer(token))).status_code == 403
    created = await client.post("/chat/sessions", json={}, headers=bearer(token))
    assert created.status_code == 403
    assert (await client.get("/chat/sessions", headers=bearer(token))).status_code == 200
