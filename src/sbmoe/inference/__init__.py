"""Turning texts into embeddings: the encode plan (length-sorted batches, torch or ONNX Runtime backend,
precision), the pooled-embedding cache and the head run over pooled embeddings; routing statistics of an
MoE head.
"""
