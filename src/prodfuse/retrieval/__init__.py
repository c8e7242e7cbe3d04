"""Retrieval over product embeddings: spaces (image, text, fused, joint), FAISS indexes, search, duplicate audit."""
