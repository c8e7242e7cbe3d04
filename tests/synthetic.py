"""Synthetic shard folders for training tests: classes separable only by the image or only by the text."""

import numpy as np

from prodfuse.data import shards

HEADER = {
    "catalog_path": "synthetic",
    "catalog_sha256": "-",
    "columns": {"id": "product_id", "split": None},
    "settings": {},
    "encoders": {},
    "versions": {},
}


def write_synthetic_shards(folder, image, text, labels, tokens=None, split=None, shard_rows=500, extra=None, ids=None):
    """Write arrays as a complete shard folder; `split` (optional) becomes a split column, `extra` maps more
    column names to per-row values (e.g. a group column)."""
    n = len(labels)
    ids = [f"p{i}" for i in range(n)] if ids is None else list(ids)
    header = {**HEADER, "columns": {**HEADER["columns"], "split": "split" if split is not None else None}}
    m = shards.open_shards(folder, header, overwrite=True)
    if tokens is None:
        tokens = np.zeros((n, 60), np.int32)
    for s in range(0, n, shard_rows):
        e = min(n, s + shard_rows)
        data = {
            "product_id": ids[s:e],
            "label": list(labels[s:e]),
            "image_embedding": image[s:e],
            "text_embedding": text[s:e],
            "has_text": np.abs(text[s:e]).sum(1) > 0,
            "text": [""] * (e - s),
            "ocr_text": [""] * (e - s),
            "tokens": tokens[s:e],
        }
        if split is not None:
            data["split"] = list(split[s:e])
        for name, values in (extra or {}).items():
            data[name] = list(values[s:e])
        shards.write_shard(folder, m, data, s, e)
    shards.finish(folder, m)
    return folder


def image_vs_text_classes(n_per_class=150, image_dim=32, text_dim=16, seed=0):
    """4 classes: img_a/img_b differ only in the image and have NO text (zero vectors, like produce);
    txt_c/txt_d share one image distribution and differ only in the text."""
    rng = np.random.default_rng(seed)
    img_proto = rng.normal(size=(2, image_dim)) * 1.5
    txt_proto = rng.normal(size=(2, text_dim)) * 1.5
    common_img = rng.normal(size=image_dim)
    images, texts, labels = [], [], []
    for c, name in enumerate(["img_a", "img_b", "txt_c", "txt_d"]):
        noise_i = rng.normal(size=(n_per_class, image_dim))
        noise_t = rng.normal(size=(n_per_class, text_dim))
        if c < 2:
            images.append(img_proto[c] + noise_i)
            texts.append(np.zeros((n_per_class, text_dim)))
        else:
            images.append(common_img + noise_i)
            texts.append(txt_proto[c - 2] + noise_t)
        labels += [name] * n_per_class
    order = rng.permutation(len(labels))
    return (
        np.concatenate(images)[order].astype(np.float32),
        np.concatenate(texts)[order].astype(np.float32),
        np.array(labels)[order],
    )
