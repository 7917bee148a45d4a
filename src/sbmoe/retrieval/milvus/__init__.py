"""Milvus vector stores: document embeddings in a Milvus collection instead of FAISS files, named by a URI.

FAISS directories stay the default and the embedded choice. A *store* is a collection in a vector
database that can shard and replicate across machines; sbmoe searches it through the same
:class:`~sbmoe.retrieval.interface.Index` call as a FAISS index, so ``sbmoe search``, ``sbmoe
evaluate --index`` and ``sbmoe serve`` take its URI wherever they take an index directory
(:func:`~sbmoe.retrieval.interface.open_index`). It is written by a resumable index job
(:mod:`sbmoe.retrieval.milvus.indexing`) and needs the ``store`` extra (``pip install
'sbmoe[store]'``). URIs (:mod:`sbmoe.retrieval.milvus.uri`)::

    milvus:PATH.db[?collection=NAME]            Milvus Lite, embedded, a local file (relative path)
    milvus:///ABSOLUTE/PATH.db[?collection=NAME] Milvus Lite at an absolute path
    milvus://HOST:PORT[/DATABASE][?collection=NAME&tls=1&shards=N&replicas=R]
                                                 a Milvus server or cluster (token: $MILVUS_TOKEN)

``collection`` defaults to ``sbmoe``; ``shards`` (a new collection's, default Milvus's own) and
``replicas`` (in-memory copies loaded for searching) apply to a server. The same code talks to both;
only the URI changes.
"""
