"""Tables. Every row carries ``team_id``; every repository query filters on it.

Tasks, insights and states are immutable version rows: a change is a new row
with the next ``version``; the current view is the highest version of each.
Messages are append-only: a reply's row is written when it starts and its text
and usage are set once, when it ends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from chathub.ids import new_id

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


ID = String(36)


def id_column() -> Mapped[str]:
    return mapped_column(ID, primary_key=True, default=new_id)


def team_column() -> Mapped[str]:
    return mapped_column(ID, ForeignKey("teams.id", ondelete="CASCADE"), index=True)


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("team_id", "email", name="uq_members_team_email"),)
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    member_id: Mapped[str] = mapped_column(ID, ForeignKey("members.id"))
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ChatSession(Base):
    __tablename__ = "chat_sessions"
    __table_args__ = (Index("ix_chat_sessions_team_mode", "team_id", "mode"),)
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    title: Mapped[str] = mapped_column(String(500), default="")
    mode: Mapped[str] = mapped_column(String(64), default="chat")
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(ID, default=None)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # The last message dashboard extraction has read (None: none yet); moved
    # in the transaction that writes what it found.
    extracted_until: Mapped[str | None] = mapped_column(ID, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a reply here last ended (None: none has yet).
    last_message_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("session_id", "client_msg_id", name="uq_messages_session_client_msg"),
    )
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    session_id: Mapped[str] = mapped_column(
        ID, ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="complete")
    client_msg_id: Mapped[str | None] = mapped_column(String(128), default=None)
    reply_to: Mapped[str | None] = mapped_column(ID, default=None)
    author_id: Mapped[str | None] = mapped_column(ID, default=None)
    mode: Mapped[str | None] = mapped_column(String(64), default=None)
    model: Mapped[str | None] = mapped_column(String(200), default=None)
    stop_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    file_ids: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    trace: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    name: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(200))
    declared_content_type: Mapped[str | None] = mapped_column(String(200), default=None)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    uploaded_by: Mapped[str | None] = mapped_column(ID, default=None)
    session_id: Mapped[str | None] = mapped_column(ID, default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class TaskVersion(Base):
    __tablename__ = "task_versions"
    __table_args__ = (UniqueConstraint("task_id", "version", name="uq_task_versions_version"),)
    row_id: Mapped[str] = id_column()
    task_id: Mapped[str] = mapped_column(ID, index=True)
    team_id: Mapped[str] = team_column()
    version: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(500))
    owner: Mapped[str | None] = mapped_column(String(200), default=None)
    due: Mapped[str | None] = mapped_column(String(32), default=None)
    status: Mapped[str] = mapped_column(String(16), default="open")
    session_id: Mapped[str | None] = mapped_column(ID, default=None)
    source_message_id: Mapped[str | None] = mapped_column(ID, default=None)
    author_kind: Mapped[str] = mapped_column(String(16), default="user")
    author_id: Mapped[str | None] = mapped_column(ID, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InsightVersion(Base):
    __tablename__ = "insight_versions"
    __table_args__ = (
        UniqueConstraint("insight_id", "version", name="uq_insight_versions_version"),
    )
    row_id: Mapped[str] = id_column()
    insight_id: Mapped[str] = mapped_column(ID, index=True)
    team_id: Mapped[str] = team_column()
    version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32), default="note")
    session_id: Mapped[str | None] = mapped_column(ID, default=None)
    source_message_id: Mapped[str | None] = mapped_column(ID, default=None)
    author_kind: Mapped[str] = mapped_column(String(16), default="user")
    author_id: Mapped[str | None] = mapped_column(ID, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StateVersion(Base):
    __tablename__ = "state_versions"
    __table_args__ = (
        UniqueConstraint("team_id", "key", "version", name="uq_state_versions_version"),
    )
    row_id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    key: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    value: Mapped[Any] = mapped_column(JSON)
    session_id: Mapped[str | None] = mapped_column(ID, default=None)
    source_message_id: Mapped[str | None] = mapped_column(ID, default=None)
    author_kind: Mapped[str] = mapped_column(String(16), default="user")
    updated_by: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DashboardSummary(Base):
    __tablename__ = "dashboard_summaries"
    __table_args__ = (
        UniqueConstraint("team_id", "version", name="uq_dashboard_summaries_version"),
    )
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    actor_id: Mapped[str | None] = mapped_column(ID, default=None)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(ID, default=None)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TeamMode(Base):
    """A mode a team defined for itself (the shipped ones live in the package)."""

    __tablename__ = "modes"
    __table_args__ = (UniqueConstraint("team_id", "name", name="uq_modes_team_name"),)
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(ID, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SessionSummary(Base):
    """The rolling summary of a session's older turns; versioned, immutable."""

    __tablename__ = "session_summaries"
    __table_args__ = (
        UniqueConstraint("session_id", "version", name="uq_session_summaries_version"),
    )
    id: Mapped[str] = id_column()
    team_id: Mapped[str] = team_column()
    session_id: Mapped[str] = mapped_column(
        ID, ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    covers_until: Mapped[str] = mapped_column(ID)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
