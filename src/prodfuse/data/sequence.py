"""Feeding shards to Keras: a PyDataset over arrays read once from the shards.

The arrays are read once (one preallocated array per column) and every batch is gathered from them by index, so
train, validation and test share the same memory and an epoch costs one pass of fancy indexing.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from prodfuse.data import shards

# Model input name -> shard column. "image_views" is no model input: it holds the augmented views of extraction's
# --views, which training draws "image" from and prediction averages over (`with_view`).
INPUT_COLUMNS = {"image": "image_embedding", "text": "text_embedding", "tokens": "tokens", "image_views": "image_views"}


def view_count(arrays: dict[str, np.ndarray]) -> int:
    """Image views per item: 1 (the whole photo) plus the augmented views stored beside it."""
    if "image_views" not in arrays or "image" not in arrays:
        return 1
    return 1 + arrays["image_views"].shape[1] // max(arrays["image"].shape[1], 1)


def with_view(arrays: dict[str, np.ndarray], view: int | np.ndarray) -> dict[str, np.ndarray]:
    """The model inputs with "image" taken from view `view` (0 = the whole photo; an array: one view per item)."""
    x = {k: v for k, v in arrays.items() if k != "image_views"}
    if "image_views" not in arrays or np.all(np.asarray(view) == 0):
        return x
    dim = arrays["image"].shape[1]
    views = arrays["image_views"].reshape(len(arrays["image"]), -1, dim)
    if np.ndim(view) == 0:
        x["image"] = views[:, int(view) - 1]
        return x
    view = np.asarray(view)
    x["image"] = np.where((view > 0)[:, None], views[np.arange(len(view)), np.maximum(view - 1, 0)], arrays["image"])
    return x


def load_inputs(folder, inputs: list[str], extra_columns: list[str] = ()) -> dict[str, np.ndarray]:
    """Read the shard columns that the given model inputs need, plus any extra (label, split, id) columns."""
    cols = [INPUT_COLUMNS[i] for i in inputs] + [c for c in extra_columns if c not in INPUT_COLUMNS.values()]
    data = shards.read_shards(folder, cols)
    return {**{i: data[INPUT_COLUMNS[i]] for i in inputs}, **{c: data[c] for c in extra_columns}}


class ShardSequence(keras.utils.PyDataset):
    """Batches of `({"image": ..., "text"|"tokens": ...}, one_hot_labels, sample_weights)`.

    `arrays` maps model input names to arrays holding every row; `rows` picks this split's rows. Training options
    (shuffle, mixup, modality dropout) act only when `training` is True. Mixup mixes the image stream and the
    labels, never the text. Modality dropout blanks one stream (chosen at random) for a fraction of items, so the
    model learns to cope with catalog items that lack text (or have a poor photo).
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        labels: np.ndarray,
        num_classes: int,
        rows=None,
        batch_size: int = 32,
        training: bool = False,
        class_weight: dict | None = None,
        mixup: float = 0.0,
        modality_dropout: float = 0.0,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1]; got {modality_dropout}")
        if mixup < 0:
            raise ValueError(f"mixup must be >= 0 (the Beta distribution's alpha); got {mixup}")
        self.arrays = arrays
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.training = training
        self.class_weight = class_weight
        self.mixup = mixup
        self.modality_dropout = modality_dropout
        self.seed = seed
        self._weights = None
        if class_weight:
            self._weights = np.array([class_weight.get(c, 1.0) for c in range(num_classes)], dtype=np.float32)
        self._rng = np.random.default_rng(seed)
        self._epoch = 0
        self._order = self.rows.copy()
        if training:
            self._rng.shuffle(self._order)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def on_epoch_end(self) -> None:
        self._epoch += 1
        if self.training:
            self._rng.shuffle(self._order)

    def __getitem__(self, index: int):
        idx = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        # Validation sees the whole photo only, so it does not gather the augmented views at all.
        x = {name: arr[idx] for name, arr in self.arrays.items() if self.training or name != "image_views"}
        # A batch's augmentation draws depend on (seed, epoch, batch) alone, not on the order in which Keras asks for
        # batches (it may ask ahead, or twice): training stays repeatable for a seed.
        rng = np.random.default_rng((self.seed, self._epoch, index))
        # Training draws one of each photo's views per epoch (augmentation); validation sees the whole photo.
        views = view_count(x)
        x = with_view(x, rng.integers(0, views, size=len(idx)) if self.training and views > 1 else 0)
        y_int = self.labels[idx]
        y = np.zeros((len(idx), self.num_classes), dtype=np.float32)
        y[np.arange(len(idx)), y_int] = 1.0
        w = self._weights[y_int] if self._weights is not None else np.ones(len(idx), np.float32)
        if self.training and self.mixup > 0 and "image" in x:
            lam = rng.beta(self.mixup, self.mixup, size=(len(idx), 1)).astype(np.float32)
            perm = rng.permutation(len(idx))
            x["image"] = lam * x["image"] + (1 - lam) * x["image"][perm]
            y = lam * y + (1 - lam) * y[perm]
            w = lam[:, 0] * w + (1 - lam[:, 0]) * w[perm]
        if self.training and self.modality_dropout > 0 and len(x) > 1:
            streams = [s for s in ("image", "text", "tokens") if s in x]
            drop = rng.random(len(idx)) < self.modality_dropout
            which = rng.integers(0, 2, size=len(idx))  # 0: blank the image, 1: blank the text
            for s in streams:
                target = drop & (which == (0 if s == "image" else 1))
                x[s][target] = 0  # x[s] is a fresh copy (fancy indexing), never the stored array
        return x, y, w.astype(np.float32)


def read_items(folder, inputs: list[str], extra: list[str] = (), rows=None) -> dict[str, np.ndarray]:
    """Model inputs (keyed by input name) and extra columns (keyed by column name) of the chosen rows."""
    cols = [INPUT_COLUMNS[i] for i in inputs] + [c for c in dict.fromkeys(extra) if c not in INPUT_COLUMNS.values()]
    data = shards.read_shards(folder, cols, rows)
    return {**{i: data[INPUT_COLUMNS[i]] for i in inputs}, **{c: data[c] for c in extra}}
