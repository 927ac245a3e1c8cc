"""The baseline for ``bench/hub_bench.py``: a bare Starlette WebSocket endpoint.

It speaks just enough of chathub's socket protocol for the benchmark's client
(``welcome`` on connect, an ``ack`` to every frame) and answers a
``message.send`` with ``--tokens`` pre-encoded ``reply.delta`` frames of the
same shape and size as chathub's, sent back to back, then one
``reply.completed``. No storage, no hub, no producer task: only the transport.

It is served by ``uvicorn.run`` with the same arguments as ``chathub serve``
(``chathub/cli.py``), so the loop (uvloop), HTTP parser (httptools) and
WebSocket implementation are the ones uvicorn picks for chathub.

    python bench/bare_ws_server.py --port 8100 --tokens 2000 --chunk 2
"""

from __future__ import annotations

import argparse
import uuid

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

# chathub's default (Settings.ws_max_frame_bytes), passed the same way.
WS_MAX_FRAME_BYTES = 64 * 1024


def reply_text(tokens: int, chunk: int) -> str:
    """The reply both servers stream: ``tokens * chunk`` characters of plain
    ASCII (letters and spaces: nothing JSON has to escape)."""
    words = "the quick brown fox jumps over the lazy dog while streaming tokens "
    n = tokens * chunk
    return (words * (n // len(words) + 1))[:n]


def delta_frames(tokens: int, chunk: int) -> tuple[list[str], str]:
    """Pre-encoded ``reply.delta`` frames shaped like chathub's
    (``Event.build``: type, session_id, seq, then the data keys) and the
    closing ``reply.completed``. Ids are UUID strings like chathub's; ``seq``
    starts at 3 as in a fresh session (1 is message.created, 2 reply.started).
    """
    session_id, reply_id = str(uuid.uuid4()), str(uuid.uuid4())
    text = reply_text(tokens, chunk)
    frames = [
        orjson.dumps(
            {
                "type": "reply.delta",
                "session_id": session_id,
                "seq": 3 + i,
                "reply_id": reply_id,
                "text": text[i * chunk : (i + 1) * chunk],
            }
        ).decode()
        for i in range(tokens)
    ]
    completed = orjson.dumps(
        {
            "type": "reply.completed",
            "session_id": session_id,
            "seq": 3 + tokens,
            "reply_id": reply_id,
            "stop_reason": "end_turn",
        }
    ).decode()
    return frames, completed


def create_app(tokens: int, chunk: int) -> Starlette:
    frames, completed = delta_frames(tokens, chunk)
    welcome = orjson.dumps({"type": "welcome", "protocol": 1}).decode()

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(welcome)
        try:
            while True:
                raw = orjson.loads(await websocket.receive_text())
                ack = {"type": "ack", "session_id": raw.get("session_id")}
                if "id" in raw:
                    ack["id"] = raw["id"]
                await websocket.send_text(orjson.dumps(ack).decode())
                if raw.get("type") == "message.send":
                    send = websocket.send_text
                    for frame in frames:
                        await send(frame)
                    await send(completed)
        except WebSocketDisconnect:
            return

    return Starlette(
        routes=[Route("/healthz", healthz), WebSocketRoute("/ws", ws_endpoint)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    # The same call as chathub.cli._serve: loop/http/ws left on "auto".
    uvicorn.run(
        create_app(args.tokens, args.chunk),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ws_max_size=WS_MAX_FRAME_BYTES,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
