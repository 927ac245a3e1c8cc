"""A small test client for the chathub socket, over a real connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection


class WsClient:
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.welcome: dict[str, Any] = {}
        self.seen: list[dict[str, Any]] = []
        self._n = 0

    @classmethod
    async def connect(
        cls, url: str, token: str | None = None, *, first_frame_auth: bool = False, **kw: Any
    ) -> WsClient:
        headers = {}
        if token and not first_frame_auth:
            headers["Authorization"] = f"Bearer {token}"
        conn = await websockets.connect(url, additional_headers=headers, max_size=None, **kw)
        client = cls(conn)
        if token and first_frame_auth:
            await client.send({"type": "auth", "token": token})
        if token:
            client.welcome = await client.expect("welcome")
        return client

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(frame))

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(self.conn.recv(), timeout)
            frame: dict[str, Any] = json.loads(raw)
            if frame.get("type") == "heartbeat":
                continue
            self.seen.append(frame)
            return frame

    async def expect(self, type: str, timeout: float = 10) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == type, frame
        return frame

    async def request(self, frame: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send a frame with a fresh id and return its ack or error (other
        frames received meanwhile are kept in ``seen``)."""
        self._n += 1
        rid = f"r{self._n}"
        await self.send({**frame, "id": rid})
        while True:
            got = await self.recv(timeout)
            if got.get("id") == rid and got["type"] in ("ack", "error", "pong"):
                return got

    async def until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> list[dict[str, Any]]:
        """Receive until ``pred`` holds for a frame; returns all frames read."""
        out: list[dict[str, Any]] = []
        while True:
            frame = await self.recv(timeout)
            out.append(frame)
            if pred(frame):
                return out

    async def first(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The first frame, among those already seen and then those still to
        come, for which ``pred`` holds (unlike :meth:`until`, which looks at
        new frames only, this finds a frame read meanwhile, say while
        :meth:`request` waited for an ack)."""
        checked = 0
        while True:
            for frame in self.seen[checked:]:
                if pred(frame):
                    return frame
            checked = len(self.seen)
            await self.recv(timeout)

    async def close(self) -> None:
        await self.conn.close()


def reply_end(reply_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def pred(frame: dict[str, Any]) -> bool:
        return frame["type"] in ("reply.completed", "reply.failed") and (
            reply_id is None or frame.get("reply_id") == reply_id
        )

    return pred
