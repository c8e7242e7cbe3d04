"""prodfuse: multimodal product classification (image + title/description + OCR text) on Keras 3.

    import prodfuse
    summary = prodfuse.extract(prodfuse.ExtractConfig(catalog="catalog.csv", out="embeddings/shop"))
    run = prodfuse.train(prodfuse.TrainConfig(embeddings="embeddings/shop", out="runs/shop"))
    predictor = prodfuse.Predictor.from_run("runs/shop")
    predictor.predict([{"image": "photo.jpg", "title": "oat milk 1 l"}], top_k=5)

`import prodfuse` is light (no TensorFlow): each name below is imported when first used. Importing
`prodfuse.modeling.fusion` registers the fusion layers with Keras, so `keras.models.load_model(".../model.keras")`
works after it (Run.load and Predictor do it for you).
"""

from __future__ import annotations

import importlib

from prodfuse.version import __version__ as __version__

# public name -> module that defines it
_API = {
    "ExtractConfig": "prodfuse.extraction.config",
    "extract": "prodfuse.extraction.extract",
    "TrainConfig": "prodfuse.modeling.config",
    "train": "prodfuse.modeling.training",
    "Run": "prodfuse.modeling.run",
    "EvaluateConfig": "prodfuse.evaluation.config",
    "evaluate": "prodfuse.evaluation.evaluate",
    "CompareConfig": "prodfuse.evaluation.config",
    "compare": "prodfuse.evaluation.compare",
    "TuneConfig": "prodfuse.evaluation.config",
    "tune": "prodfuse.evaluation.tune",
    "AuditLabelsConfig": "prodfuse.evaluation.config",
    "audit_labels": "prodfuse.evaluation.label_audit",
    "PredictConfig": "prodfuse.inference.config",
    "predict": "prodfuse.inference.batch",
    "Predictor": "prodfuse.inference.predictor",
    "read_shards": "prodfuse.data.shards",
    "Columns": "prodfuse.data.catalog",
    "read_catalog": "prodfuse.data.catalog",
    "keep_freed_heap_mapped": "prodfuse.allocator",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prodfuse' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
