"""sbmoe: dense retrieval with a single-block Mixture-of-Experts (SB-MoE) head."""

__version__ = "0.1.0"
