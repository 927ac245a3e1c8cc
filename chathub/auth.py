"""Credentials: API keys and JWTs. Pure functions, no I/O (but a debug log line
saying why a token was refused).

An API key is ``chk_<prefix>_<secret>``; only its SHA-256 is stored, with the
visible prefix. A JWT carries the member, team and role of the key it was
exchanged for; ``exp``, ``iat``, ``aud`` and ``iss`` are always checked.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from chathub.config import Settings
from chathub.errors import Unauthorized

ROLES = ("viewer", "member", "admin", "owner")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
KEY_PREFIX = "chk_"

log = logging.getLogger("chathub.auth")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a member of one team, acting with one role."""

    member_id: str
    team_id: str
    role: str
    api_key_id: str | None = None
    expires_at: float | None = None
    """When the credential stops being valid (a JWT's ``exp``, in Unix
    seconds); None for an API key, which lasts until it is revoked."""

    def has_role(self, minimum: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[minimum]


@dataclass(frozen=True)
class NewApiKey:
    secret: str
    prefix: str
    key_hash: str


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_api_key() -> NewApiKey:
    prefix = secrets.token_hex(4)
    secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(secret=secret, prefix=f"{KEY_PREFIX}{prefix}", key_hash=hash_api_key(secret))


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


class TokenCodec:
    """Issues and verifies JWTs with the configured algorithm and keys."""

    def __init__(self, settings: Settings) -> None:
        self.algorithm = settings.jwt_algorithm
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.ttl_s = settings.jwt_ttl_s
        if self.algorithm == "RS256":
            if not settings.jwt_private_key_file or not settings.jwt_public_key_file:
                from chathub.config import ConfigError

                raise ConfigError(
                    "RS256 needs CHATHUB_JWT_PRIVATE_KEY_FILE and CHATHUB_JWT_PUBLIC_KEY_FILE"
                )
            self._signing_key: str = settings.jwt_private_key_file.read_text()
            self._verify_key: str = settings.jwt_public_key_file.read_text()
        else:
            self._signing_key = self._verify_key = settings.jwt_signing_secret()

    def issue(self, principal: Principal) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": principal.member_id,
            "team_id": principal.team_id,
            "role": principal.role,
            "iat": now,
            "exp": now + self.ttl_s,
            "aud": self.audience,
            "iss": self.issuer,
        }
        if principal.api_key_id:
            claims["kid"] = principal.api_key_id
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired") from exc
        except jwt.InvalidTokenError as exc:
            # PyJWT's words are about its parsing, not for the caller.
            log.debug("token refused: %s", exc)
            raise Unauthorized("invalid token") from exc
        role = claims.get("role")
        team_id = claims.get("team_id")
        key_id = claims.get("kid")
        if (
            role not in ROLE_RANK
            or not isinstance(team_id, str)
            or not isinstance(key_id, str | None)
        ):
            raise Unauthorized("invalid token claims")
        return Principal(
            member_id=str(claims["sub"]),
            team_id=team_id,
            role=role,
            api_key_id=key_id,
            expires_at=float(claims["exp"]),
        )
