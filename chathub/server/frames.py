"""WebSocket frames: parsing client frames and encoding server frames.

Pure functions over data. A client frame that is not valid JSON, not an
object, has an unknown ``type``, breaks :mod:`chathub.client_json`'s rules
(a NUL in a string, nesting too deep) or has a missing or wrong-typed field raises
:class:`~chathub.errors.BadRequest` carrying the frame's ``id`` when one could
be read, so the caller answers with an ``error`` frame and keeps the socket.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from chathub.client_json import find_problem
from chathub.errors import BadRequest

RequestId = Annotated[str, Field(max_length=64)]
Ident = Annotated[str, Field(min_length=1, max_length=64)]


class ClientFrame(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    id: RequestId | None = None


class AuthFrame(ClientFrame):
    type: Literal["auth"]
    token: Annotated[str, Field(min_length=1, max_length=4096)]


class JoinFrame(ClientFrame):
    type: Literal["join"]
    session_id: Ident
    after_seq: Annotated[int, Field(ge=0)] | None = None


class LeaveFrame(ClientFrame):
    type: Literal["leave"]
    session_id: Ident


class SendFrame(ClientFrame):
    type: Literal["message.send"]
    session_id: Ident
    client_msg_id: Annotated[str, Field(min_length=1, max_length=128)]
    content: Annotated[str, Field(min_length=1)]
    mode: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")] | None = None
    file_ids: Annotated[list[Ident], Field(max_length=20)] | None = None


class CancelFrame(ClientFrame):
    type: Literal["reply.cancel"]
    reply_id: Ident


class SubscribeFrame(ClientFrame):
    type: Literal["subscribe"]
    channel: Literal["dashboard", "sessions"]


class UnsubscribeFrame(ClientFrame):
    type: Literal["unsubscribe"]
    channel: Literal["dashboard", "sessions"]


class PingFrame(ClientFrame):
    type: Literal["ping"]


AnyFrame = Annotated[
    AuthFrame
    | JoinFrame
    | LeaveFrame
    | SendFrame
    | CancelFrame
    | SubscribeFrame
    | UnsubscribeFrame
    | PingFrame,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[AnyFrame] = TypeAdapter(AnyFrame)
FRAME_TYPES = frozenset(
    ["auth", "join", "leave", "message.send", "reply.cancel", "subscribe", "unsubscribe", "ping"]
)


class FrameError(BadRequest):
    """A bad client frame; ``request_id`` is echoed in the ``error`` frame."""

    def __init__(self, detail: str, request_id: str | None) -> None:
        super().__init__(detail)
        self.request_id = request_id


def parse_frame(text: str) -> AnyFrame:
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FrameError("frame is not valid JSON", None) from exc
    if not isinstance(raw, dict):
        raise FrameError("frame must be a JSON object", None)
    request_id = raw.get("id")
    if not isinstance(request_id, str) or len(request_id) > 64:
        if request_id is not None:
            raise FrameError("id must be a string of at most 64 characters", None)
        request_id = None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise FrameError("frame needs a string field 'type'", request_id)
    if kind not in FRAME_TYPES:
        raise FrameError(f"unknown frame type {kind!r}", request_id)
    problem = find_problem(raw)
    if problem is not None:
        raise FrameError(problem, request_id)
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or kind
        raise FrameError(f"{where}: {first['msg']}", request_id) from exc


def encode(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()
