"""The HTTP search service: a model and an index loaded once, micro-batched encoding, and the FastAPI
app around it (``sbmoe serve``).
"""
