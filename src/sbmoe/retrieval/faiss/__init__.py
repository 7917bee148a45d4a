"""FAISS indexes: :class:`~sbmoe.retrieval.faiss.index.DenseIndex` (exact, HNSW or IVF; float32 or float16),
the files of an index directory with their checksums, the builds of FAISS's own index types, and the
exact top-k scan of flat indexes.
"""
