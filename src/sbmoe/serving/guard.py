"""What stands between the network and the search app: an API key, a size limit, and a graceful stop.

:class:`Guard` is ASGI middleware in front of the FastAPI app of :mod:`sbmoe.serving.http`. It
refuses, before the app sees them, requests without the API key (401) and request bodies above the
size limit (413), and while the server stops it answers 503 to new requests; :class:`Gate` counts
the requests in progress so that the server closes its socket only once they are answered. It also
answers ``GET /health`` itself: a liveness probe is asked often and needs none of the app's work.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATH = "/health"
# Answered without the key: a load balancer's liveness probe has none to give.
OPEN_PATHS = frozenset({HEALTH_PATH})
HEALTHY = json.dumps({"status": "ok"}, separators=(",", ":")).encode()  # as the app writes JSON
WORKER_STOPPED = "the search worker has stopped"


class Gate:
    """Whether the server is stopping, and how many requests are in progress (thread-safe)."""

    def __init__(self) -> None:
        self.stopping = False
        self._in_flight = 0
        self._changed = threading.Condition()

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered."""
        return self._in_flight

    def enter(self) -> None:
        with self._changed:
            self._in_flight += 1

    def leave(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def stop_when_idle(self, timeout: float) -> bool:
        """Refuse new requests from now on; wait until none is in progress (or ``timeout`` seconds).

        Returns:
            Whether every request in progress was answered in time.
        """
        self.stopping = True
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout)


class Guard:
    """ASGI middleware: 503 while stopping, 401 without the API key, 413 above the size limit.

    Args:
        app: The app behind the guard.
        gate: Shared with the server, which stops through :meth:`Gate.stop_when_idle`.
        api_key: The key every request but ``GET /health`` must give, as ``Authorization: Bearer
            KEY`` or ``X-API-Key: KEY`` (compared in constant time); ``None``: no key.
        max_body_bytes: Largest request body accepted, declared or sent (chunked bodies are counted).
        alive: Whether the service behind the app can answer: ``GET /health`` says 200 or 503.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: Gate,
        api_key: str | None,
        max_body_bytes: int,
        alive: Callable[[], bool],
    ) -> None:
        self.app = app
        self.gate = gate
        self.alive = alive
        self._key = api_key.encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: the app's start-up and shutdown
            await self.app(scope, receive, send)
            return
        if self.gate.stopping:
            await _refuse(send, 503, "the service is stopping: send the request again later or elsewhere")
            return
        if scope["path"] == HEALTH_PATH and scope["method"] in ("GET", "HEAD"):
            await self._health(scope["method"] == "HEAD", send)
            return
        headers = dict(scope["headers"])
        if self._key is not None and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            message = (
                "a valid API key is required: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
            await _refuse(send, 401, message, [(b"www-authenticate", b"Bearer")])
            return
        self.gate.enter()
        try:
            body = await self._read_body(headers, receive)
            if body is None:
                message = f"the request body is larger than the limit of {self.max_body_bytes} bytes"
                await _refuse(send, 413, message)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.gate.leave()

    async def _health(self, head_only: bool, send: Send) -> None:
        if not self.alive():
            await _refuse(send, 503, WORKER_STOPPED)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(HEALTHY)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head_only else HEALTHY})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if given is None and scheme.lower() == b"bearer":
            given = token.strip()
        return given is not None and hmac.compare_digest(given, self._key)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole request body, or ``None`` once it exceeds the limit (declared or counted)."""
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then waits on the client as usual."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _refuse(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    extra = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    extra.append((b"connection", b"close"))  # the body may be left unread: the connection is not reused
    await send({"type": "http.response.start", "status": status, "headers": extra + (headers or [])})
    await send({"type": "http.response.body", "body": body})
