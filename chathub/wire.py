"""Contract objects shared by REST bodies and WebSocket events, so a message
looks the same wherever a client meets it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    trace: dict[str, Any] | None = Field(
        default=None, description="intermediate results of a reasoning flow (admins only)"
    )


def message_view(row: object) -> dict[str, Any]:
    """A stored message as the JSON-ready object of the contract (the trace
    is for admins over REST, never in session events)."""
    return MessageOut.model_validate(row).model_dump(mode="json", exclude={"trace"})
