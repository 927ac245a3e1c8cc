"""Client frame parsing (``chathub.server.frames``): pure, no server.

Every client frame type, valid and invalid. A bad frame raises
:class:`FrameError` (a ``bad_request``) that carries the frame's ``id`` when
one could be read, so the socket can answer it and stay open.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chathub.server.frames import (
    AuthFrame,
    CancelFrame,
    FrameError,
    JoinFrame,
    LeaveFrame,
    PingFrame,
    SendFrame,
    SubscribeFrame,
    UnsubscribeFrame,
    encode,
    parse_frame,
)

SID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def parse(frame: Any) -> Any:
    return parse_frame(json.dumps(frame))


def bad(frame: Any) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse(frame)
    return info.value


# -- valid frames ------------------------------------------------------------


def test_auth() -> None:
    frame = parse({"type": "auth", "token": "chk_abc", "id": "a1"})
    assert isinstance(frame, AuthFrame)
    assert frame.token == "chk_abc" and frame.id == "a1"


def test_join_with_and_without_after_seq() -> None:
    plain = parse({"type": "join", "session_id": SID})
    assert isinstance(plain, JoinFrame)
    assert plain.session_id == SID and plain.after_seq is None and plain.id is None
    resumed = parse({"type": "join", "session_id": SID, "after_seq": 0})
    assert isinstance(resumed, JoinFrame) and resumed.after_seq == 0
    assert parse({"type": "join", "session_id": SID, "after_seq": 41}).after_seq == 41


def test_leave() -> None:
    frame = parse({"type": "leave", "session_id": SID, "id": "x"})
    assert isinstance(frame, LeaveFrame) and frame.session_id == SID and frame.id == "x"


def test_message_send_minimal_and_full() -> None:
    minimal = parse(
        {"type": "message.send", "session_id": SID, "client_msg_id": "c1", "content": "hi"}
    )
    assert isinstance(minimal, SendFrame)
    assert (minimal.client_msg_id, minimal.content, minimal.mode, minimal.file_ids) == (
        "c1",
        "hi",
        None,
        None,
    )
    full = parse(
        {
            "type": "message.send",
            "session_id": SID,
            "client_msg_id": "c2",
            "content": "plan it",
            "mode": "plan",
            "file_ids": ["f1", "f2"],
        }
    )
    assert isinstance(full, SendFrame)
    assert full.mode == "plan" and full.file_ids == ["f1", "f2"]


def test_reply_cancel() -> None:
    frame = parse({"type": "reply.cancel", "reply_id": "r-1"})
    assert isinstance(frame, CancelFrame) and frame.reply_id == "r-1"


def test_subscribe_and_unsubscribe_dashboard() -> None:
    assert isinstance(parse({"type": "subscribe", "channel": "dashboard"}), SubscribeFrame)
    assert isinstance(parse({"type": "unsubscribe", "channel": "dashboard"}), UnsubscribeFrame)
    assert isinstance(parse({"type": "subscribe", "channel": "sessions"}), SubscribeFrame)


def test_ping_with_id() -> None:
    frame = parse({"type": "ping", "id": "p" * 64})
    assert isinstance(frame, PingFrame) and frame.id == "p" * 64


def test_unknown_fields_are_ignored() -> None:
    """Forward compatibility: a newer client may send fields we do not know."""
    frame = parse({"type": "ping", "id": "p", "sent_at": 123, "trace": {"a": 1}})
    assert isinstance(frame, PingFrame)


# -- invalid frames ----------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "{", "not json", '{"type": "ping"', "\x00", '{"type": "ping"} trailing']
)
def test_invalid_json(text: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(text)
    assert info.value.code == "bad_request" and info.value.request_id is None


@pytest.mark.parametrize("value", [[], [{"type": "ping"}], "ping", 5, None, True])
def test_not_an_object(value: Any) -> None:
    err = bad(value)
    assert err.request_id is None and "object" in err.detail


def test_missing_or_non_string_type_keeps_the_id() -> None:
    assert bad({"id": "q1"}).request_id == "q1"
    assert bad({"type": 5, "id": "q2"}).request_id == "q2"
    assert bad({"type": None, "id": "q3"}).request_id == "q3"


def test_unknown_type_keeps_the_id() -> None:
    err = bad({"type": "message.edit", "id": "q4"})
    assert err.request_id == "q4" and "message.edit" in err.detail


@pytest.mark.parametrize("rid", ["x" * 65, 5, ["a"], {"a": 1}, True])
def test_bad_id_is_refused_and_not_echoed(rid: Any) -> None:
    err = bad({"type": "ping", "id": rid})
    assert err.request_id is None and "id" in err.detail


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "auth"}, "token"),
        ({"type": "auth", "token": ""}, "token"),
        ({"type": "auth", "token": 12}, "token"),
        ({"type": "join"}, "session_id"),
        ({"type": "join", "session_id": ""}, "session_id"),
        ({"type": "join", "session_id": 7}, "session_id"),
        ({"type": "join", "session_id": "s" * 65}, "session_id"),
        ({"type": "join", "session_id": SID, "after_seq": "x"}, "after_seq"),
        ({"type": "join", "session_id": SID, "after_seq": "3"}, "after_seq"),
        ({"type": "join", "session_id": SID, "after_seq": -1}, "after_seq"),
        ({"type": "join", "session_id": SID, "after_seq": 1.5}, "after_seq"),
        ({"type": "join", "session_id": SID, "after_seq": True}, "after_seq"),
        ({"type": "leave"}, "session_id"),
        ({"type": "leave", "session_id": None}, "session_id"),
        ({"type": "message.send", "client_msg_id": "c", "content": "hi"}, "session_id"),
        ({"type": "message.send", "session_id": SID, "content": "hi"}, "client_msg_id"),
        ({"type": "message.send", "session_id": SID, "client_msg_id": "c"}, "content"),
        (
            {"type": "message.send", "session_id": SID, "client_msg_id": "c", "content": 5},
            "content",
        ),
        (
            {"type": "message.send", "session_id": SID, "client_msg_id": "c", "content": ""},
            "content",
        ),
        (
            {"type": "message.send", "session_id": SID, "client_msg_id": 1, "content": "hi"},
            "client_msg_id",
        ),
        (
            {"type": "message.send", "session_id": SID, "client_msg_id": "c" * 129, "content": "a"},
            "client_msg_id",
        ),
        (
            {
                "type": "message.send",
                "session_id": SID,
                "client_msg_id": "c",
                "content": "hi",
                "mode": "Not A Mode!",
            },
            "mode",
        ),
        (
            {
                "type": "message.send",
                "session_id": SID,
                "client_msg_id": "c",
                "content": "hi",
                "file_ids": "f1",
            },
            "file_ids",
        ),
        (
            {
                "type": "message.send",
                "session_id": SID,
                "client_msg_id": "c",
                "content": "hi",
                "file_ids": [1],
            },
            "file_ids",
        ),
        (
            {
                "type": "message.send",
                "session_id": SID,
                "client_msg_id": "c",
                "content": "hi",
                "file_ids": [f"f{i}" for i in range(21)],
            },
            "file_ids",
        ),
        ({"type": "reply.cancel"}, "reply_id"),
        ({"type": "reply.cancel", "reply_id": ""}, "reply_id"),
        ({"type": "reply.cancel", "reply_id": 3}, "reply_id"),
        ({"type": "subscribe"}, "channel"),
        ({"type": "subscribe", "channel": "session"}, "channel"),
        ({"type": "unsubscribe", "channel": 1}, "channel"),
    ],
)
def test_missing_or_wrong_typed_field_names_it_and_keeps_the_id(
    frame: dict[str, Any], field: str
) -> None:
    err = bad({**frame, "id": "req-9"})
    assert err.code == "bad_request"
    assert err.request_id == "req-9"
    assert field in err.detail, err.detail


def test_error_frame_shape() -> None:
    err = bad({"type": "join", "id": "j1"})
    assert err.frame(err.request_id) == {
        "type": "error",
        "id": "j1",
        "code": "bad_request",
        "message": err.detail,
    }
    assert "id" not in bad([1]).frame(None)


def test_encode_is_compact_json() -> None:
    text = encode({"type": "pong", "id": "é"})
    assert json.loads(text) == {"type": "pong", "id": "é"}
    assert " " not in text


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "join", "session_id": "\x00"}, "session_id"),
        ({"type": "leave", "session_id": "s\x00"}, "session_id"),
        (
            {"type": "message.send", "session_id": SID, "client_msg_id": "c", "content": "h\x00"},
            "content",
        ),
        (
            {"type": "message.send", "session_id": SID, "client_msg_id": "\x00", "content": "hi"},
            "client_msg_id",
        ),
        (
            {
                "type": "message.send",
                "session_id": SID,
                "client_msg_id": "c",
                "content": "hi",
                "file_ids": ["f", "\x00"],
            },
            "file_ids[1]",
        ),
        ({"type": "reply.cancel", "reply_id": "\x00"}, "reply_id"),
        ({"type": "ping", "extra": {"k\x00": 1}}, "extra"),
    ],
)
def test_a_nul_anywhere_is_refused_naming_the_field_and_keeping_the_id(
    frame: dict[str, Any], field: str
) -> None:
    # PostgreSQL cannot store (nor compare with) a NUL: it would crash the socket.
    err = bad({**frame, "id": "n1"})
    assert err.request_id == "n1"
    assert err.detail.startswith(field) and "NUL" in err.detail, err.detail


def test_a_frame_nested_too_deep_is_refused() -> None:
    deep: Any = []
    for _ in range(200):
        deep = [deep]
    err = bad({"type": "ping", "id": "d1", "extra": deep})
    assert err.request_id == "d1" and "nested deeper" in err.detail
