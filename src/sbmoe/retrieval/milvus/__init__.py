"""Milvus vector stores: document embeddings in a Milvus collection (Milvus Lite or a server), named by a
``milvus:`` URI, written by a resumable index job and searched like a FAISS index.
"""
