"""Catalog -> OCR + image/text embeddings -> parquet shard folder."""
