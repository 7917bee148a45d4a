"""Fine-tuning: training pairs and batches, hard negatives, losses, gradient caching, head-only training
on cached embeddings, dev evaluation, the checkpoint, the run log and the trainer that ties them
together.
"""
