"""The `joint` space: two projection towers that map a product's image embedding and its text embedding close
together, trained contrastively (symmetric InfoNCE, learnable temperature) on the stored embeddings.

An align run folder holds `model.keras` (a Functional model: {"image", "text"} -> {"image", "text"}, unit vectors),
`config.json` (the settings, the shards' extraction, the learned temperature), `metrics.json` (retrieval on the
validation rows: Recall@1/5/10 and MRR both ways, next to chance) and `history.csv`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from prodfuse.checks import as_dict
from prodfuse.data import shards
from prodfuse.data.catalog import file_sha256
from prodfuse.modeling.run import prepare_run_folder
from prodfuse.retrieval.config import AlignConfig
from prodfuse.version import __version__

KIND = "align"
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0


@keras.saving.register_keras_serializable(package="prodfuse")
class ContrastiveLogits(keras.layers.Layer):
    """[B, B] similarities of two batches of unit vectors, divided by a learned temperature (kept in [0.01, 1])."""

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def build(self, input_shape):
        self.log_inv_temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(1.0 / self.temperature)), name="log_inv_t"
        )

    def call(self, inputs):
        a, b = inputs
        scale = keras.ops.exp(
            keras.ops.clip(self.log_inv_temperature, math.log(1 / MAX_TEMPERATURE), math.log(1 / MIN_TEMPERATURE))
        )
        return scale * keras.ops.matmul(a, keras.ops.transpose(b))

    def learned_temperature(self) -> float:
        value = float(keras.ops.convert_to_numpy(self.log_inv_temperature))
        return float(np.clip(math.exp(-value), MIN_TEMPERATURE, MAX_TEMPERATURE))

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


class SymmetricInfoNCE(keras.losses.Loss):
    """Cross-entropy of each row of the [B, B] logits towards its diagonal, image->text and text->image averaged;
    `y_true` is unused (the match of item i is item i of the batch)."""

    def call(self, y_true, y_pred):
        n = keras.ops.shape(y_pred)[0]
        labels = keras.ops.arange(n)
        a = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        b = keras.losses.sparse_categorical_crossentropy(labels, keras.ops.transpose(y_pred), from_logits=True)
        return (a + b) / 2


def _tower(x, hidden: int, dim: int, dropout: float, prefix: str):
    x = keras.layers.UnitNormalization(name=f"{prefix}_l2_in")(x)
    if hidden:
        x = keras.layers.Dense(hidden, activation="gelu", name=f"{prefix}_hidden")(x)
        x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
    x = keras.layers.Dense(dim, name=f"{prefix}_proj")(x)
    return keras.layers.UnitNormalization(name=f"{prefix}_out")(x)


def build_towers(image_dim: int, text_dim: int, dim: int = 256, hidden: int = 512, dropout: float = 0.1):
    """Functional model {"image": [B, image_dim], "text": [B, text_dim]} -> {"image": [B, dim], "text": [B, dim]}."""
    image = keras.Input((image_dim,), name="image")
    text = keras.Input((text_dim,), name="text")
    outputs = {
        "image": _tower(image, hidden, dim, dropout, "image"),
        "text": _tower(text, hidden, dim, dropout, "text"),
    }
    return keras.Model({"image": image, "text": text}, outputs, name="prodfuse_align")


def tower(model, side: str):
    """The one-input sub-model of a side ("image" or "text") of the towers."""
    return keras.Model(model.input[side], model.output[side], name=f"align_{side}")


def _rows(cfg: AlignConfig, manifest: dict, data: dict) -> dict[str, np.ndarray]:
    """Train / val row positions among the rows that have text."""
    with_text = np.asarray(data["has_text"], bool)
    split_col = cfg.split_col or manifest["columns"].get("split")
    if cfg.val_embeddings is None and split_col and split_col in data:
        split = np.char.lower(np.asarray(data[split_col]).astype(str))
        train = np.flatnonzero(with_text & (split == "train"))
        val = np.flatnonzero(with_text & np.isin(split, ["val", "valid", "validation", "dev"]))
        if len(train) and len(val):
            return {"train": train, "val": val, "source": f"split column {split_col!r}"}
    rows = np.flatnonzero(with_text)
    if cfg.val_embeddings is not None:
        return {"train": rows, "val": None, "source": f"all rows; validation from {cfg.val_embeddings}"}
    rng = np.random.default_rng(cfg.seed)
    rows = rng.permutation(rows)
    n_val = max(1, int(round(cfg.val_fraction * len(rows))))
    return {"train": np.sort(rows[n_val:]), "val": np.sort(rows[:n_val]), "source": f"seeded {cfg.val_fraction:.0%}"}


def _read(folder: Path, split_col: str | None) -> dict:
    cols = ["image_embedding", "text_embedding", "has_text"]
    present = shards.shard_columns(folder)
    missing = [c for c in cols if c not in present]
    if missing:
        raise ValueError(
            f"align needs image and text embeddings; shards {str(folder)!r} lack {missing} (extract with a text "
            f"encoder other than 'tokens', and an image backbone)"
        )
    if split_col and split_col in present:
        cols.append(split_col)
    return shards.read_shards(folder, cols)


def retrieval_metrics(query: np.ndarray, target: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Item i of `query` should find item i of `target` (unit vectors): Recall@k and mean reciprocal rank."""
    sims = query @ target.T
    correct = np.diag(sims)
    ranks = 1 + (sims > correct[:, None]).sum(axis=1)  # ties count in the query's favour
    out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out


def chance_metrics(n: int, ks=(1, 5, 10)) -> dict:
    out = {f"recall@{k}": min(1.0, k / n) for k in ks}
    out["mrr"] = float(np.sum(1.0 / np.arange(1, n + 1)) / n)
    return out


def align(cfg: AlignConfig) -> dict:
    """Train the towers and save the align run folder; returns its config.json record (with "metrics")."""
    folder = Path(cfg.embeddings)
    manifest = shards.read_manifest(folder)
    split_col = cfg.split_col or manifest["columns"].get("split")
    data = _read(folder, split_col)
    rows = _rows(cfg, manifest, data)
    image, text = data["image_embedding"], data["text_embedding"]
    if rows["val"] is None:
        val_manifest = shards.read_manifest(cfg.val_embeddings)
        if val_manifest.get("encoders") != manifest.get("encoders"):
            raise ValueError(
                f"val_embeddings {cfg.val_embeddings!r} were made with other encoders than {cfg.embeddings!r}: "
                f"{val_manifest.get('encoders')} vs {manifest.get('encoders')}"
            )
        v = _read(Path(cfg.val_embeddings), None)
        keep = np.asarray(v["has_text"], bool)
        val_image, val_text = v["image_embedding"][keep], v["text_embedding"][keep]
    else:
        val_image, val_text = image[rows["val"]], text[rows["val"]]
    train_image, train_text = image[rows["train"]], text[rows["train"]]
    if len(train_image) < 2 * 8 or len(val_image) < 2:
        raise ValueError(
            f"too few items with text to align: {len(train_image)} train, {len(val_image)} validation "
            f"({rows['source']}); align needs products that have both a photo and text"
        )
    run = prepare_run_folder(cfg.out, cfg.overwrite)
    keras.utils.set_random_seed(cfg.seed)
    towers = build_towers(image.shape[1], text.shape[1], cfg.dim, cfg.hidden, cfg.dropout)
    logits_layer = ContrastiveLogits(cfg.temperature, name="logits")
    z = towers(towers.input)
    trainer = keras.Model(towers.input, logits_layer([z["image"], z["text"]]), name="align_trainer")
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss=SymmetricInfoNCE())
    batch = min(cfg.batch_size, len(train_image))
    # Every batch full-sized: a short last batch would be an easier task with fewer negatives.
    steps = len(train_image) // batch
    n_fit = steps * batch
    val_batch = min(cfg.batch_size, len(val_image))
    n_val = (len(val_image) // val_batch) * val_batch
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train_image))[:n_fit]  # a fixed subset only if the train rows do not divide evenly
    start = time.perf_counter()
    history = trainer.fit(
        {"image": train_image[order], "text": train_text[order]},
        np.zeros((n_fit, 1), np.float32),
        batch_size=batch,
        epochs=cfg.epochs,
        shuffle=True,
        validation_data=({"image": val_image[:n_val], "text": val_text[:n_val]}, np.zeros((n_val, 1), np.float32)),
        validation_batch_size=val_batch,
        verbose=cfg.verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True),
            keras.callbacks.CSVLogger(str(run / "history.csv")),
        ],
    )
    seconds = time.perf_counter() - start
    towers.save(run / "model.keras")
    zi = embed_side(towers, "image", val_image)
    zt = embed_side(towers, "text", val_text)
    metrics = {
        "val_items": int(len(val_image)),
        "text_to_image": retrieval_metrics(zt, zi),
        "image_to_text": retrieval_metrics(zi, zt),
        "chance": chance_metrics(len(val_image)),
    }
    record = {
        "kind": KIND,
        "versions": {"prodfuse": __version__},
        "align": as_dict(cfg),
        "embeddings": str(folder.resolve()),
        "manifest_sha256": file_sha256(folder / shards.MANIFEST),
        "extraction": {
            "catalog_path": manifest["catalog_path"],
            "columns": manifest["columns"],
            "settings": manifest["settings"],
            "encoders": manifest["encoders"],
        },
        "rows": {"source": rows["source"], "train": int(n_fit), "val": int(len(val_image))},
        "temperature": logits_layer.learned_temperature(),
        "epochs_run": len(history.history["loss"]),
        "best_val_loss": float(np.min(history.history["val_loss"])),
        "train_seconds": round(seconds, 1),
        "model_sha256": file_sha256(run / "model.keras"),
        "metrics": metrics,
    }
    (run / "config.json").write_text(json.dumps(record, indent=1))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return {**record, "out": str(run)}


def embed_side(towers, side: str, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Unit vectors [n, dim] of one side's embeddings."""
    if len(x) == 0:
        return np.zeros((0, int(towers.output[side].shape[-1])), np.float32)
    model = tower(towers, side)
    return np.asarray(model.predict(np.asarray(x, np.float32), batch_size=batch_size, verbose=0), np.float32)


def load_align_run(path) -> tuple[object, dict]:
    """(towers model, config.json) of an align run folder."""
    path = Path(path)
    cpath = path / "config.json"
    if not cpath.is_file() or not (path / "model.keras").is_file():
        raise ValueError(
            f"{str(path)!r} is not an align run folder (no config.json / model.keras); make one with `prodfuse align`"
        )
    config = json.loads(cpath.read_text())
    if config.get("kind") != KIND:
        raise ValueError(
            f"{str(path)!r} is a training run, not an align run: space 'joint' needs `prodfuse align` output "
            f"(a training run gives space 'fused')"
        )
    model = keras.models.load_model(path / "model.keras", compile=False)
    return model, config
