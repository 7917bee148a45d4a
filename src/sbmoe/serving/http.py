"""``sbmoe serve``: the search service (:mod:`sbmoe.serving.service`) over HTTP, with FastAPI and uvicorn.

Endpoints: ``POST /search`` (one query or a batch; ids, scores, and on request titles, texts and
the queries' expert routing), ``POST /embed`` (embeddings of queries or documents), ``GET /health``
and ``GET /info``. Requests are validated (pydantic) and refused with a 4xx status and a one-line
message naming the field; an optional API key, a body size limit and the graceful stop are the
:mod:`sbmoe.serving.guard`'s. Concurrent requests are micro-batched by the service (see
:mod:`sbmoe.serving.service`). FastAPI and uvicorn are the ``serve`` extra (``pip install
'sbmoe[serve]'``), imported only when an app is built.

This module does not postpone annotations: FastAPI reads the request models of the endpoints,
which are defined inside :func:`create_app` with the limits of its :class:`ServeConfig`.
"""

import asyncio
import contextlib
import functools
import importlib.util
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from sbmoe.config.jobs import SearchConfig, ServeConfig
from sbmoe.core.errors import SbmoeError, UsageError
from sbmoe.serving.guard import Gate, Guard
from sbmoe.serving.service import KINDS, NO_DOCUMENTS, SearchService, ServiceClosedError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

API_KEY_VARIABLE = "SBMOE_API_KEY"
# How long a stopping server waits for the requests in progress before it closes anyway.
STOP_TIMEOUT_SECONDS = 60.0


def _require_extra() -> None:
    """Fail in one line, not with an ImportError, when the ``serve`` extra is not installed."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"serving needs {' and '.join(missing)}: pip install 'sbmoe[serve]'")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the text is empty: give the text to search for or encode")
    return text


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no tokenizer takes it
        raise ValueError("the text holds a lone UTF-16 surrogate: it is not text") from None
    return text


def api_key(config: ServeConfig) -> str | None:
    """The key requests must give: ``config.api_key``, else ``$SBMOE_API_KEY``, else none."""
    key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_VARIABLE)
    if key is not None and not key.strip():
        raise UsageError(f"{API_KEY_VARIABLE} is set but empty: give a key, or unset it to serve without one")
    return key


def create_app(service: SearchService, config: ServeConfig | None = None) -> "FastAPI":
    """The FastAPI app answering with ``service``; the service is closed when the app shuts down.

    The app's :class:`~sbmoe.serving.guard.Gate` is ``app.state.gate``: the servers of this module
    stop through it (new requests get 503 until those in progress are answered).

    Args:
        service: The loaded model and index (a :class:`~sbmoe.serving.service.SearchService`).
        config: The request limits (``max_top_k``, ``max_texts``, ``max_request_bytes``) and the
            API key (:func:`api_key`); host and port are the server's.
    """
    _require_extra()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

    config = _checked(config, service.search_config)
    Text = Annotated[str, AfterValidator(_not_blank), AfterValidator(_encodable)]
    TopK = Annotated[int, Field(ge=1, le=config.max_top_k, strict=True)]  # not true, 2.5 or "3"
    Texts = Annotated[list[Text], Field(min_length=1, max_length=config.max_texts)]

    class SearchRequest(BaseModel):
        """Either ``query`` or ``queries``."""

        model_config = ConfigDict(extra="forbid")
        query: Text | None = None
        queries: Texts | None = None
        top_k: TopK = service.search_config.top_k
        documents: bool = Field(False, description="also return each hit's title and text")
        routing: bool = Field(False, description="also return each query's top-1 expert and gate")

        @model_validator(mode="after")
        def one_source(self) -> "SearchRequest":
            if (self.query is None) == (self.queries is None):
                raise ValueError("give either query (one text) or queries (a list of texts)")
            return self

    class EmbedRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: Texts
        kind: Literal[KINDS] = "query"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="sbmoe", description="Dense retrieval with an SB-MoE head", lifespan=lifespan)
    app.state.gate = Gate()
    key = api_key(config)
    app.add_middleware(
        Guard,
        gate=app.state.gate,
        api_key=key,
        max_body_bytes=config.max_request_bytes,
        alive=lambda: service.alive,
    )

    @app.exception_handler(SbmoeError)
    async def refused(request: Any, error: SbmoeError) -> JSONResponse:
        unavailable = isinstance(error, ServiceClosedError)  # shutting down: try again elsewhere
        return JSONResponse({"detail": str(error)}, status_code=503 if unavailable else 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, error: RequestValidationError) -> JSONResponse:
        # Field and reason only: echoing the input fails on what JSON cannot hold (NaN, Infinity).
        return JSONResponse({"detail": _validation_message(error.errors())}, status_code=422)

    @app.post("/search")
    async def search(request: SearchRequest) -> JSONResponse:
        if request.documents and service.documents is None:
            raise UsageError(NO_DOCUMENTS)
        texts = [request.query] if request.query is not None else request.queries
        results = await asyncio.wrap_future(service.search(texts, request.top_k, routing=request.routing))
        answers = []
        for text, result in zip(texts, results, strict=True):
            hits = [{"id": doc_id, "score": score} for doc_id, score in result.hits]
            if request.documents:
                for hit in hits:
                    document = service.document(hit["id"])
                    hit.update(title=document.title, text=document.text)
            answer: dict[str, Any] = {"query": text, "hits": hits}
            if request.routing:
                answer["routing"] = {"expert": result.expert, "gate": result.gate}
            answers.append(answer)
        return JSONResponse({"results": answers})

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> JSONResponse:
        embeddings = await asyncio.wrap_future(service.embed(request.texts, request.kind))
        return JSONResponse(
            {"kind": request.kind, "dim": int(embeddings.shape[1]), "embeddings": embeddings.tolist()}
        )

    @app.get("/info")
    async def info() -> JSONResponse:
        limits = {"max_top_k": config.max_top_k, "max_texts": config.max_texts}
        limits["max_request_bytes"] = config.max_request_bytes
        # Requests received and not yet answered, this one included.
        return JSONResponse({**service.info(), "limits": limits, "in_progress": app.state.gate.in_flight})

    return app


def serve(
    load_service: Callable[[], SearchService],
    config: ServeConfig | None = None,
    *,
    log_level: str = "info",
    announce: Callable[[str], None] | None = None,
) -> None:
    """Answer HTTP requests with the service ``load_service`` builds until interrupted.

    Ctrl-C or SIGTERM shuts down cleanly: the server keeps listening, answering 503 to new
    requests, until those in progress are answered; then it closes (a second Ctrl-C: at once).

    Args:
        load_service: Builds the :class:`~sbmoe.serving.service.SearchService` (loads the model,
            opens the index with :func:`~sbmoe.retrieval.interface.open_index`); called once the
            port is taken, so that a busy port fails before anything loads.
        config: Host, port, request limits and the service's concurrency.
        log_level: uvicorn's log level (``warning`` drops the per-request lines).
        announce: Called with the URL once the service listens (the command line prints it, so
            ``--port 0`` is reachable under ``-q`` too); without it, the URL is logged.
    """
    _require_extra()
    config = config or ServeConfig()
    config.validate()
    listening = _listen(config.host, config.port)
    try:
        service = load_service()
        app = create_app(service, config)
        where = service.index.location or "an index in memory"
        logger.info("serving %s: %d documents, %s", where, len(service.index), service.info()["concurrency"])
        if api_key(config) is None and not ipaddress.ip_address(listening.getsockname()[0]).is_loopback:
            logger.warning(
                "listening beyond loopback without an API key: anyone who reaches the port can search"
            )
        server = _uvicorn_server(app, log_level)
        _stop_on_signal(server, app.state.gate)
        (announce or functools.partial(logger.info, "listening on %s"))(_url(listening))
        # uvicorn shuts down gracefully on Ctrl-C, then raises it again for the caller: done, then.
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[listening])
    finally:
        listening.close()


class BackgroundServer:
    """Serve an app from a thread of this process, e.g. in tests, benchmarks or a notebook.

    Use as a context manager: the server is up (at :attr:`url`) inside the block and shut down
    cleanly at its end.

    Args:
        app: From :func:`create_app`.
        host: Address to listen on.
        port: TCP port; 0 takes a free one (see :attr:`url`).
        log_level: uvicorn's log level.
    """

    def __init__(
        self, app: "FastAPI", host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self._socket = _listen(host, port)
        self.url = _url(self._socket)
        self._gate: Gate | None = getattr(app.state, "gate", None)
        self._server = _uvicorn_server(app, log_level)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="sbmoe-serve", daemon=True
        )

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UsageError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Answer the requests in progress (new ones get 503), then stop the server and the app's service."""
        if self._gate is not None and self._server.started:
            self._gate.stop_when_idle(STOP_TIMEOUT_SECONDS)
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close()


def _uvicorn_server(app: "FastAPI", log_level: str) -> "uvicorn.Server":
    """A uvicorn server for ``app`` whose every accepted TCP connection has Nagle's algorithm off.

    asyncio turns ``TCP_NODELAY`` on only for sockets created with ``proto=IPPROTO_TCP``, which
    ``socket.create_server`` and many callers' sockets are not; uvicorn then writes a response's
    head and body separately, and the body waits for the client's delayed ACK (about 40 ms per
    response on Linux). Setting the option on each connection holds whatever socket is served.
    """
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    protocol = import_from_string(HTTP_PROTOCOLS["auto"])

    class NoDelayProtocol(protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            connection = transport.get_extra_info("socket")
            if connection is not None and connection.family in (socket.AF_INET, socket.AF_INET6):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, http=NoDelayProtocol))


def _stop_on_signal(server: "uvicorn.Server", gate: Gate) -> None:
    """On the first Ctrl-C or SIGTERM, stop ``server`` once ``gate`` has no request in progress.

    Meanwhile the socket stays open and new requests get 503 (uvicorn alone would close it at
    once, refusing connections). A second signal is uvicorn's own: stop now.
    """
    default = server.handle_exit

    def stop_when_idle() -> None:
        if not gate.stop_when_idle(STOP_TIMEOUT_SECONDS):
            logger.warning(
                "stopping with %d requests unanswered after %.0f s", gate.in_flight, STOP_TIMEOUT_SECONDS
            )
        server.should_exit = True

    def handle_exit(sig: int, frame: Any) -> None:
        if gate.stopping:
            default(sig, frame)
        else:
            gate.stopping = True
            threading.Thread(target=stop_when_idle, name="sbmoe-serve-stop", daemon=True).start()

    server.handle_exit = handle_exit  # uvicorn installs self.handle_exit as the signal handler


def _validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line naming each refused field and why, e.g. ``top_k: Input should be a valid integer``."""
    reasons = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        reasons.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(reasons) or "invalid request"


def _checked(config: ServeConfig | None, search: SearchConfig) -> ServeConfig:
    """``config`` (or the default), validated, and not below ``search``'s default ``top_k``."""
    config = config or ServeConfig()
    config.validate()
    if search.top_k > config.max_top_k:
        raise UsageError(f"top_k {search.top_k} is above max_top_k {config.max_top_k}")
    return config


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, as ``host`` resolves)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def _url(listening: socket.socket) -> str:
    host, port = listening.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
