"""Embeddings in, ranx-style runs out: the FAISS index (exact, IVF, HNSW; fingerprinted and
checksummed), sharded indexes, and the index and search jobs.

An index records the fingerprint of the model that built it and refuses queries from another.
"""
