"""The retriever: backbone, pooling, the SB-MoE head (or the linear-adapter control) and normalisation
as sentence-transformers modules, saved and loaded as one folder.

Also the model card written beside every saved model and pushing to / loading from the Hugging Face hub.
"""
