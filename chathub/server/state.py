"""The resources one running app owns, built by the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chathub.auth import TokenCodec
from chathub.config import Settings
from chathub.llm.base import LLMProvider
from chathub.server.bus import Bus
from chathub.server.credentials import SocketCredentials
from chathub.server.dashboards import Dashboards
from chathub.server.extraction import Extractor
from chathub.server.hub import Hub
from chathub.server.ratelimit import RateLimiter
from chathub.server.replies import Replies
from chathub.server.session_feed import SessionFeed
from chathub.server.session_log import SessionLog
from chathub.storage.blobs import BlobStore


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    tokens: TokenCodec
    blobs: BlobStore
    provider: LLMProvider
    named_providers: dict[str, LLMProvider]
    """The operator's further providers (``CHATHUB_LLM_PROVIDERS``), by name."""
    session_log: SessionLog
    bus: Bus
    hub: Hub
    replies: Replies
    limiter: RateLimiter
    """The rate limits' buckets (in process, or shared through Redis), the
    same ones ``replies`` takes messages from."""
    dashboards: Dashboards
    session_feed: SessionFeed
    extractor: Extractor
    credentials: SocketCredentials
