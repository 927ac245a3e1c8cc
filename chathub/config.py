"""Settings, read from the environment (prefix ``CHATHUB_``) and nowhere else.

The embedded default needs no configuration at all: a SQLite file and a JWT
secret under ``data_dir``, an in-process bus and the local model. Setting
``CHATHUB_DATABASE_URL`` to PostgreSQL leaves the embedded default, and then a
real JWT secret is required (every replica must sign with the same one).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_JWT_SECRET = "change-me"
MIN_JWT_SECRET_BYTES = 32


class ConfigError(RuntimeError):
    """The settings cannot run a server; the message says what to change."""


DATABASE_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_database_url(url: str) -> str:
    """``url`` if chathub can use it (``postgresql+asyncpg://`` or
    ``sqlite+aiosqlite://``); else a ValueError saying what to write."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        driver = make_url(url).drivername
    except ArgumentError:
        raise ValueError(
            "not a database URL; expected postgresql+asyncpg://USER:PASSWORD@HOST/DB "
            "or sqlite+aiosqlite:///PATH"
        ) from None
    if driver in DATABASE_DRIVERS.values():
        return url
    backend = "postgresql" if driver.split("+")[0] in ("postgres", "postgresql") else driver
    if backend in DATABASE_DRIVERS:
        wanted = DATABASE_DRIVERS[backend]
        raise ValueError(f"{driver}:// has no driver chathub uses; write {wanted}:// instead")
    raise ValueError(
        f"{driver}:// is not supported; chathub runs on postgresql+asyncpg:// "
        "or sqlite+aiosqlite://"
    )


def check_redis_url(url: str) -> str:
    """``url`` if it names a Redis server (``redis://``, ``rediss://`` for
    TLS, ``unix://`` for a socket); else a ValueError."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"{url!r} is not a Redis URL; expected redis://HOST:PORT/DB, rediss:// (TLS) "
            "or unix:///PATH"
        )
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATHUB_", extra="ignore")

    data_dir: Path = Path("./chathub-data")
    database_url: str | None = None
    redis_url: str | None = None
    # Past one Redis: the session log sharded by session id over these Redis
    # URLs (a JSON list, the same on every instance, in the same order); the
    # bus, leases and rate limits stay on ``redis_url``.
    redis_log_shards: list[str] = Field(default_factory=list)
    llm: str = "local://"
    # Further providers that modes may name in their ``provider`` field, as a
    # JSON object of name to URL (the operator's choice: a team picks among
    # them, it cannot point the server at a URL of its own).
    llm_providers: dict[str, str] = Field(default_factory=dict)

    jwt_secret: SecretStr | None = None
    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    jwt_private_key_file: Path | None = None
    jwt_public_key_file: Path | None = None
    jwt_audience: str = "chathub"
    jwt_issuer: str = "chathub"
    jwt_ttl_s: int = Field(default=3600, ge=60, le=86400)

    max_file_bytes: int = Field(default=25 * 1024 * 1024, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # json: a JSON object per line; text; auto: text on a terminal, else JSON.
    log_format: Literal["auto", "json", "text"] = "auto"
    # The interactive API documentation (/docs, /redoc) and the OpenAPI
    # schema (/openapi.json), served without credentials.
    api_docs: bool = True

    # WebSocket transport
    allowed_origins: list[str] = Field(default_factory=list)
    ws_max_frame_bytes: int = 64 * 1024
    ws_auth_timeout_s: float = 10.0
    ws_heartbeat_s: float = 20.0
    ws_send_queue: int = 1024
    # Open sockets one member may hold on this instance (each worker of
    # ``--workers`` counts its own); the next is closed with 4429. 0: no cap.
    ws_max_per_member: int = Field(default=50, ge=0)
    # permessage-deflate costs more CPU than it saves on small token frames.
    ws_compression: bool = False
    # The proxies whose X-Forwarded-For/-Proto headers are believed (client
    # address, scheme): comma-separated addresses or networks, or "*".
    forwarded_allow_ips: str = "127.0.0.1"

    # Replies
    coalesce_ms: float = 30.0
    coalesce_chars: int = 512
    session_log_length: int = 10_000
    session_log_ttl_s: int = 86_400
    reply_timeout_s: float = 300.0
    lease_ttl_s: float = 10.0
    # A streaming reply's text so far is stored this often (0: never), for a
    # reaper to keep when the instance dies and the log no longer has it.
    reply_checkpoint_s: float = Field(default=5.0, ge=0)
    extraction_debounce_s: float = 1.0

    # Deleted sessions (their messages) and deleted files' records are
    # erased this many days after their delete (0: kept for ever).
    purge_deleted_after_days: float = Field(default=30.0, ge=0)

    # Input limits, per minute (0 turns one off). Shared through Redis when set.
    rate_user_messages: int = Field(default=30, ge=0)
    rate_team_messages: int = Field(default=600, ge=0)
    rate_user_tokens: int = Field(default=50_000, ge=0)
    rate_team_tokens: int = Field(default=500_000, ge=0)
    max_message_chars: int = Field(default=32_000, ge=1)
    rate_user_sessions: int = Field(default=60, ge=0)
    # Upload bytes: the declared Content-Length, else the stored size.
    rate_user_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    rate_team_upload_bytes: int = Field(default=2 * 1024 * 1024 * 1024, ge=0)

    # The streaming output guardrail holds back at most this much (a sentence
    # end releases earlier); see chathub.llm.guardrails.holdback.
    guardrail_holdback_chars: int = Field(default=128, ge=16)
    guardrail_holdback_ms: float = Field(default=250.0, gt=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        return check_database_url(value) if value else None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return check_redis_url(value) if value else value

    @field_validator("redis_log_shards")
    @classmethod
    def _redis_log_shards(cls, value: list[str]) -> list[str]:
        return [check_redis_url(url) for url in value]

    @property
    def redis_prefix(self) -> str:
        """The prefix of chathub's Redis keys and pub/sub channels: with
        ``CHATHUB_REDIS_URL`` on database N (not 0), ``chathub:dbN``. Keys
        live in their database, but pub/sub channels are one namespace for
        the whole server: without this, two deployments on one Redis server
        would read each other's events."""
        from redis.connection import parse_url

        url = self.redis_url
        db = int(parse_url(url).get("db") or 0) if url else 0  # type: ignore[no-untyped-call]
        return f"chathub:db{db}" if db else "chathub"

    def check_redis(self) -> None:
        """Raise ConfigError for Redis settings that cannot run."""
        if self.redis_log_shards and not self.redis_url:
            raise ConfigError(
                "CHATHUB_REDIS_LOG_SHARDS needs CHATHUB_REDIS_URL too "
                "(the bus, the leases and the rate limits)"
            )
        if len(set(self.redis_log_shards)) != len(self.redis_log_shards):
            raise ConfigError("CHATHUB_REDIS_LOG_SHARDS lists a Redis URL twice")

    @property
    def embedded(self) -> bool:
        """True when running on the no-configuration defaults (SQLite file)."""
        return self.database_url is None or self.database_url.startswith("sqlite")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'chathub.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    def jwt_signing_secret(self) -> str:
        """The HS256 secret. On the embedded default a random one is kept in
        ``data_dir``; anywhere else a missing or default secret is refused."""
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret is not None else ""
        if secret not in ("", DEFAULT_JWT_SECRET):
            if len(secret.encode()) < MIN_JWT_SECRET_BYTES:
                # RFC 7518 3.2: an HS256 key at least as long as the hash.
                raise ConfigError(
                    f"CHATHUB_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes long"
                )
            return secret
        if not self.embedded:
            raise ConfigError(
                "CHATHUB_JWT_SECRET must be set to a strong random value "
                "when CHATHUB_DATABASE_URL points at a shared database"
            )
        path = self.data_dir / "jwt-secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()
