"""Contract objects shared by REST bodies and WebSocket events, so a message
looks the same wherever a client meets it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SessionOut(Out):
    id: str
    title: str
    mode: str
    archived: bool
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    last_seq: int
    last_message_at: datetime | None = None


class MessageOut(Out):
    id: str
    session_id: str
    role: str
    content: str
    status: str
    client_msg_id: str | None
    reply_to: str | None
    mode: str | None
    model: str | None
    stop_reason: str | None
    usage: dict[str, Any] | None
    created_at: datetime
    completed_at: datetime | None
    file_ids: list[str] = Field(
        default_factory=list, description="the files attached to this message"
    )
    trace: dict[str, Any] | None = Field(
        default=None, description="intermediate results of a reasoning flow (admins only)"
    )

    @field_validator("file_ids", mode="before")
    @classmethod
    def _stored_ids(cls, value: object) -> list[str]:
        return stored_file_ids(value) if not isinstance(value, list) else value


def stored_file_ids(value: object) -> list[str]:
    """The file ids as a message row keeps them (``{"ids": [...]}`` or None),
    from the row or from that value."""
    stored = getattr(value, "file_ids", value)
    if isinstance(stored, dict) and isinstance(stored.get("ids"), list):
        return [str(i) for i in stored["ids"]]
    return []


def message_view(row: object) -> dict[str, Any]:
    """A stored message as the JSON-ready object of the contract (the trace
    is for admins over REST, never in session events)."""
    return MessageOut.model_validate(row).model_dump(mode="json", exclude={"trace"})
