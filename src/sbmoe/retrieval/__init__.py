"""Embeddings in, ranx-style runs out: one :class:`Index` protocol, opened by :func:`open_index`, over
FAISS indexes (``faiss/``: exact, IVF, HNSW; fingerprinted and checksummed), sharded ones
(``sharded/``) and Milvus stores (``milvus/``), and the index and search jobs.

An index records the fingerprint of the model that built it and refuses queries from another.
"""

from sbmoe.retrieval.interface import Index, open_index

__all__ = ["Index", "open_index"]
