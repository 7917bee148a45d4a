"""Sharded indexes: a directory of FAISS index directories, one per contiguous slice of the corpus,
searched shard by shard (:class:`~sbmoe.retrieval.sharded.index.ShardedIndex`) or merged into one.
"""
