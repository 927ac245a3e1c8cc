"""The resources one running app owns, built by the lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chathub.auth import TokenCodec
from chathub.config import Settings
from chathub.storage.blobs import BlobStore

if TYPE_CHECKING:
    from chathub.llm.base import LLMProvider


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    tokens: TokenCodec
    blobs: BlobStore
    provider: LLMProvider | None = None
    extras: dict[str, object] = field(default_factory=dict)
