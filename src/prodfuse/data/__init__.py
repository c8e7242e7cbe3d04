"""Catalogs, parquet shards, splits and the Keras feed over them."""
