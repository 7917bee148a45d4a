"""How sbmoe lays out a Milvus collection: fields, settings property, index, and the connection to it.

One collection holds one corpus encoded by one model:

* ``doc_id`` (primary key, VARCHAR) and ``embedding`` (FLOAT_VECTOR, inner-product metric);
* for models with an MoE head, ``top_expert`` (INT32, the gate's argmax) and ``gate_weights``
  (ARRAY of FLOAT, the gate's softmax), so a user can filter or inspect by expert
  (``filter="top_expert == 2"``);
* the collection property ``sbmoe.meta``: a JSON object with the fingerprint of the model that made
  the vectors, the dimension, the corpus size, the index settings and the caller's metadata.

The same code talks to Milvus Lite (a local ``.db``, embedded in the process) and to a Milvus server
or cluster; see :mod:`sbmoe.retrieval.milvus` for the URIs. What a server needs beyond Milvus Lite is
here too: every request bounded by the URI's timeout and failing in one line
(:class:`BoundedClient`), the index built on flushed segments before a write job ends
(:func:`finish_writing`), and a read timestamp for searches (:func:`server_timestamp`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sbmoe.config.jobs import IndexConfig
from sbmoe.core.errors import MissingInputError, SbmoeError, UsageError, first_line
from sbmoe.retrieval.faiss.index_types import default_nlist, default_nprobe
from sbmoe.retrieval.milvus.uri import StoreURI, missing_extra_message

META_PROPERTY = "sbmoe.meta"
FORMAT_VERSION = 1
ID_FIELD = "doc_id"
VECTOR_FIELD = "embedding"
EXPERT_FIELD = "top_expert"
GATE_FIELD = "gate_weights"
MAX_ID_LENGTH = 2048
_HNSW_M = 32
_HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128  # as the FAISS HNSW index searches
# Settings that must agree for a collection to be resumed rather than rebuilt.
SETTINGS = ("fingerprint", "corpus", "dim", "count", "index_type", "nlist", "experts")
# Seconds to wait for a server to accept the connection (a request's own limit is the URI's timeout).
CONNECT_TIMEOUT = 10.0
# Seconds between two looks at an index being built, and between two progress lines about it.
_POLL_SECONDS = 1.0
_REPORT_SECONDS = 30.0
# Milvus 2.3 builds no index on a segment of fewer rows (minSegmentNumRowsToEnableIndex): those
# are searched by brute force, and a query node may serve the others before their index too.
_MIN_INDEXED_ROWS = 1024
logger = logging.getLogger(__name__)


class StoreServerError(SbmoeError, ConnectionError):
    """A Milvus server could not be reached, did not answer in time, or refused a request."""


def _where(uri: StoreURI) -> str:
    return f"the Milvus server at {uri.address}" if uri.address else f"the Milvus Lite database {uri.path}"


@contextlib.contextmanager
def server_errors(uri: StoreURI, request: str) -> Iterator[None]:
    """Turn what pymilvus raises for a failed ``request`` into one line (:class:`StoreServerError`)."""
    import grpc

    pymilvus = pymilvus_module()
    try:
        yield
    except grpc.RpcError as error:  # pymilvus lets a request's deadline through as gRPC's own error
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise StoreServerError(
                f"{_where(uri)} did not answer {request} within {uri.timeout:g} s: is it stopped or "
                f"overloaded? (a busy server may be given longer with ?timeout=SECONDS in the URI)"
            ) from None
        reason = f"{error.code().name} {error.details()}"
        raise StoreServerError(f"{_where(uri)} failed {request}: {reason}") from None
    except pymilvus.exceptions.MilvusException as error:
        raise StoreServerError(f"{_where(uri)} refused {request}: {first_line(error.message)}") from None


class BoundedClient:
    """A ``MilvusClient`` whose every request ends within the URI's timeout, failing in one line.

    A server that stops answering would otherwise hold a request (and pymilvus's retries of it)
    for minutes; calls are forwarded unchanged otherwise, so the class is a drop-in client.
    """

    def __init__(self, client: Any, uri: StoreURI) -> None:
        self.client = client
        self.uri = uri
        self._bounded = uri.address is not None  # Milvus Lite runs in this process: nothing to wait for

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute
        takes_timeout = self._bounded and "timeout" in inspect.signature(attribute).parameters

        def bounded(*args: Any, **kwargs: Any) -> Any:
            if takes_timeout:
                kwargs.setdefault("timeout", self.uri.timeout)
            with server_errors(self.uri, name):
                return attribute(*args, **kwargs)

        return bounded


def pymilvus_module() -> Any:
    """The ``pymilvus`` module, or a one-line error naming the extra that installs it."""
    try:
        import pymilvus
    except ImportError:
        raise UsageError(missing_extra_message("pymilvus")) from None
    return pymilvus


def require_engine(uri: StoreURI) -> None:
    """Check that the packages ``uri`` needs are installed (before any expensive work).

    Raises:
        UsageError: one line naming the extra to install.
    """
    pymilvus_module()
    if uri.is_embedded:
        try:
            import milvus_lite  # noqa: F401  (pymilvus opens a local file through it)
        except ImportError:
            raise UsageError(missing_extra_message("milvus-lite")) from None


def _not_an_unimplemented_method(record: logging.LogRecord) -> bool:
    """False for the traceback Milvus Lite's in-process gRPC server logs for a method it does not
    implement: ``AllocTimestamp``, which pymilvus asks for while waiting for an index to be built
    (every ``index --store``) and then does without. Nothing is wrong, so it never reaches the user."""
    return not (record.exc_info and record.exc_info[0] is NotImplementedError)


def connect(uri: StoreURI, create: bool) -> BoundedClient:
    """A client for ``uri``; a Milvus Lite file is created only when ``create``.

    Raises:
        StoreServerError: the server cannot be reached, does not answer, or lacks the URI's database.
        MissingInputError: no Milvus Lite file there (without ``create``).
        UsageError: the Milvus Lite path cannot be used.
    """
    require_engine(uri)
    pymilvus = pymilvus_module()
    if uri.is_embedded:
        logging.getLogger("grpc._server").addFilter(_not_an_unimplemented_method)  # kept once
        return BoundedClient(_open_lite(pymilvus, uri, create), uri)
    token = os.environ.get("MILVUS_TOKEN", "")
    within = min(CONNECT_TIMEOUT, uri.timeout)
    started = time.monotonic()
    try:
        client = pymilvus.MilvusClient(
            uri=uri.address, token=token, db_name=uri.database or "", timeout=within
        )
    except pymilvus.exceptions.MilvusException:
        if time.monotonic() - started >= 0.9 * within:
            raise StoreServerError(
                f"the Milvus server at {uri.address} did not answer within {within:g} s: is it stopped, "
                f"or is something other than Milvus listening there?"
            ) from None
        raise StoreServerError(
            f"could not connect to a Milvus server at {uri.address}: nothing accepts connections there, "
            f"or it does not speak Milvus's protocol; is the server running, and is the port its gRPC "
            f"port (19530 by default)?"
        ) from None
    bounded = BoundedClient(client, uri)
    if uri.database and uri.database not in bounded.list_databases():
        bounded.close()
        raise StoreServerError(
            f"the Milvus server at {uri.address} has no database {uri.database!r}; create it first "
            f"(pymilvus: MilvusClient(...).create_database({uri.database!r})) or leave it out of the URI"
        )
    return bounded


def _open_lite(pymilvus: Any, uri: StoreURI, create: bool) -> Any:
    """A ``MilvusClient`` on the Milvus Lite database ``uri.path`` (a folder); one line if it cannot be."""
    if os.path.exists(uri.path) and not os.path.isdir(uri.path):
        raise UsageError(
            f"{uri.path} is a file, not a Milvus Lite database (Milvus Lite keeps one in a folder); "
            "nothing was changed: choose another path"
        )
    if not create and not os.path.exists(uri.path):
        raise MissingInputError(
            f"no Milvus Lite database at {uri.path}; build it with `sbmoe index ... --store {uri.text}`"
        )
    try:
        os.makedirs(os.path.dirname(uri.path), exist_ok=True)
        return pymilvus.MilvusClient(uri.path)
    except (OSError, pymilvus.exceptions.MilvusException) as error:
        reason = _unwritable(uri.path) or (
            f"{getattr(error, 'message', None) or first_line(error)}; Milvus Lite lets one process at a "
            "time open a database: is another sbmoe using it? (Shards run one after another on a file; to "
            "write them at once, use a Milvus server.)"
        )
        raise UsageError(f"could not open the Milvus Lite database {uri.path}: {reason}") from None


def _unwritable(path: str) -> str | None:
    """Why nothing can be written at ``path`` (Milvus Lite writes there even to read), if so."""
    place = os.path.abspath(path)
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if os.access(place, os.W_OK):
        return None
    if os.statvfs(place).f_flag & os.ST_RDONLY:
        return f"{place} is on a read-only file system; choose a --store path you can write to"
    return f"you have no permission to write in {place}; choose a --store path you can write to"


def release(uri: StoreURI) -> None:
    """Stop this process's embedded server for a Milvus Lite file, so other processes may open it."""
    if uri.is_embedded:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri.path)


def store_meta(
    fingerprint: str,
    dim: int,
    count: int,
    config: IndexConfig,
    experts: int,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """The settings a collection is created with and resumed by (its ``sbmoe.meta`` property).

    ``config``'s index type defaults to ``flat``; its ``nlist`` and ``nprobe`` apply to ``ivf`` and
    default as for a FAISS IVF index of ``count`` vectors.
    """
    index_type, nlist, nprobe = config.index_type or "flat", config.nlist, config.nprobe
    if index_type != "ivf" and (nlist is not None or nprobe is not None):
        raise UsageError(f"nlist and nprobe apply to ivf, not {index_type!r}")
    if index_type == "ivf":
        nlist = default_nlist(count) if nlist is None else nlist
        nprobe = min(nlist, default_nprobe(nlist) if nprobe is None else nprobe)
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as error:
        raise UsageError(f"metadata must be JSON-serialisable: {error}") from None
    return {
        "fingerprint": fingerprint,
        "corpus": metadata.get("collection"),
        "dim": int(dim),
        "count": int(count),
        "index_type": index_type,
        "nlist": nlist,
        "nprobe": nprobe,
        "experts": int(experts),
        "metric": "IP",
        "metadata": dict(metadata),
    }


def read_meta(client: Any, uri: StoreURI) -> dict[str, Any]:
    """The checked ``sbmoe.meta`` property of the collection ``uri`` names (which must exist)."""
    properties = client.describe_collection(uri.collection).get("properties") or {}
    text = properties.get(META_PROPERTY)
    if text is None:
        raise UsageError(
            f"collection {uri.collection!r} of {uri.text} was not written by sbmoe (it has no "
            f"{META_PROPERTY} property); use another ?collection=NAME"
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{uri.text}: the {META_PROPERTY} property is not valid JSON ({error})") from None
    missing = [key for key in ("fingerprint", "dim", "count", "index_type") if key not in meta]
    if missing:
        raise UsageError(f"{uri.text}: the {META_PROPERTY} property lacks {', '.join(missing)}")
    return meta


def load_collection(client: Any, uri: StoreURI) -> None:
    """Load the collection for searching, with the URI's replicas (a server's default: one)."""
    client.load_collection(uri.collection, **({"replica_number": uri.replicas} if uri.replicas else {}))


def _connection(client: BoundedClient) -> Any:
    """pymilvus's connection under the client: the calls MilvusClient has no public method for."""
    return client.client._get_connection()


def server_timestamp(client: BoundedClient) -> int | None:
    """The server's clock now, as a Milvus hybrid timestamp, or ``None`` where it cannot tell it.

    Searches that guarantee this timestamp see every write made before it, without Strong
    consistency's wait for the server's next time tick (about 200 ms) on every request.
    """
    with server_errors(client.uri, "alloc_timestamp"):
        timestamp = _connection(client).alloc_timestamp(timeout=client.uri.timeout)
    return int(timestamp) or None  # 0: a server that does not implement it


def finish_writing(
    client: BoundedClient, uri: StoreURI, exact: bool, report: Callable[[str], None] = logger.info
) -> None:
    """Seal what a write job put into a server's collection and wait until searches use its index.

    Milvus indexes sealed segments only; rows still in growing segments are searched by brute force
    or a temporary index (Milvus 2.3: IVF with nprobe 16, recall far below the collection's index)
    until the server seals them on its own, minutes later. A flush seals them, the index nodes
    build the collection's index on them, and the query nodes then swap the growing segments for
    the indexed ones; the job ends once the query nodes serve every row that way (the server may
    go on merging segments and indexing the merged ones: searches keep their quality).
    ``exact`` (a FLAT collection): a sealed segment is searched exactly whether or not the query
    node lists an index on it (Milvus builds no FLAT index files, and a segment sealed while the job
    was still writing is served without one), so only growing segments are waited for. Each look
    at the progress is one bounded request, so a live server may take as long as the index needs,
    and one that stops answering fails in one line. Milvus Lite builds its index on load: nothing
    to do.
    """
    if uri.is_embedded:
        return
    client.flush(uri.collection)
    started = last_report = time.monotonic()
    while True:
        state = client.describe_index(uri.collection, VECTOR_FIELD)
        total, indexed = int(state.get("total_rows", 0)), int(state.get("indexed_rows", 0))
        if state.get("state") == "Failed":
            raise StoreServerError(
                f"the Milvus server at {uri.address} could not build the index of collection "
                f"{uri.collection!r}: {state.get('index_state_fail_reason') or 'no reason given'}"
            )
        with server_errors(uri, "get_query_segment_info"):
            segments = _connection(client).get_query_segment_info(uri.collection, timeout=uri.timeout)
        ready = sum(s.num_rows for s in segments if segment_searched_as_built(s, exact))
        if ready >= total:  # compactions may go on re-indexing merged segments: nobody waits for them
            return
        if time.monotonic() - last_report >= _REPORT_SECONDS:
            last_report = time.monotonic()
            report(
                f"{uri.text}: {indexed:,} of {total:,} rows indexed, {ready:,} served from indexed "
                f"segments ({last_report - started:.0f} s)"
            )
        time.sleep(_POLL_SECONDS)


def segment_searched_as_built(segment: Any, exact: bool) -> bool:
    """Whether a query node searches ``segment`` (a query segment info) as the collection's index
    searches: sealed, and for an approximate index, through that index (segments too small for
    Milvus to index are searched exactly)."""
    from pymilvus.grpc_gen.common_pb2 import SegmentState  # the segment came from pymilvus

    if segment.state == SegmentState.Growing:
        return False
    return exact or bool(segment.index_name) or segment.num_rows < _MIN_INDEXED_ROWS


def create_collection(client: Any, uri: StoreURI, meta: Mapping[str, Any]) -> None:
    """Create the collection ``uri`` names, with ``meta`` (:func:`store_meta`) as its settings."""
    data_type = pymilvus_module().DataType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID_FIELD, data_type.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
    schema.add_field(VECTOR_FIELD, data_type.FLOAT_VECTOR, dim=meta["dim"])
    if meta["experts"]:
        schema.add_field(EXPERT_FIELD, data_type.INT32)
        schema.add_field(
            GATE_FIELD, data_type.ARRAY, element_type=data_type.FLOAT, max_capacity=meta["experts"]
        )
    index_params = client.prepare_index_params()
    if meta["index_type"] == "flat":
        index_params.add_index(field_name=VECTOR_FIELD, index_type="FLAT", metric_type="IP")
    elif meta["index_type"] == "hnsw":
        index_params.add_index(
            field_name=VECTOR_FIELD,
            index_type="HNSW",
            metric_type="IP",
            params={"M": _HNSW_M, "efConstruction": _HNSW_EF_CONSTRUCTION},
        )
    else:
        index_params.add_index(
            field_name=VECTOR_FIELD, index_type="IVF_FLAT", metric_type="IP", params={"nlist": meta["nlist"]}
        )
    client.create_collection(
        uri.collection,
        schema=schema,
        index_params=index_params,
        consistency_level="Strong",
        properties={META_PROPERTY: json.dumps(meta, sort_keys=True)},
        **({"num_shards": uri.shards} if uri.shards else {}),
    )
