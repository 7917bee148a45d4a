"""How sbmoe lays out a Milvus collection: fields, settings property, index, and the connection to it.

One collection holds one corpus encoded by one model:

* ``doc_id`` (primary key, VARCHAR) and ``embedding`` (FLOAT_VECTOR, inner-product metric);
* for models with an MoE head, ``top_expert`` (INT32, the gate's argmax) and ``gate_weights``
  (ARRAY of FLOAT, the gate's softmax), so a user can filter or inspect by expert
  (``filter="top_expert == 2"``);
* the collection property ``sbmoe.meta``: a JSON object with the fingerprint of the model that made
  the vectors, the dimension, the corpus size, the index settings and the caller's metadata.

The same code talks to Milvus Lite (a local ``.db``, embedded in the process) and to a Milvus server
or cluster; see :mod:`sbmoe.retrieval.milvus` for the URIs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from sbmoe.config.jobs import IndexConfig
from sbmoe.core.errors import MissingInputError, UsageError, first_line
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


def connect(uri: StoreURI, create: bool) -> Any:
    """A ``MilvusClient`` for ``uri``; a Milvus Lite file is created only when ``create``."""
    require_engine(uri)
    pymilvus = pymilvus_module()
    if uri.is_embedded:
        logging.getLogger("grpc._server").addFilter(_not_an_unimplemented_method)  # kept once
        return _open_lite(pymilvus, uri, create)
    token = os.environ.get("MILVUS_TOKEN", "")
    try:
        return pymilvus.MilvusClient(uri=uri.address, token=token, db_name=uri.database or "")
    except pymilvus.exceptions.MilvusException as error:
        raise UsageError(f"could not reach the Milvus server at {uri.address}: {error.message}") from None


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
