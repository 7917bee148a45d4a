"""Fine-tuning: training pairs and batches, hard negatives, losses, gradient caching, head-only training
on cached embeddings, dev evaluation, and the trainer with its parts: optimiser and loss wiring, the
checkpoint (safetensors and JSON, nothing pickled), the run log, model selection.
"""
