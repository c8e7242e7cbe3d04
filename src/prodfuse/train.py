"""Training: shards -> splits -> fusion model -> run folder (model, labels, config, history, metrics, curves)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from . import shards
from .catalog import file_sha256
from .splits import make_splits, split_from_column, stratified_split  # noqa: F401  (re-exported)

DEMO_EMBEDDINGS = Path("embeddings") / "demo"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", default=None, help="shard folder (default embeddings/demo)")
    p.add_argument("--val-embeddings", default=None, help="separate shard folder used as the validation split")
    p.add_argument("--test-embeddings", default=None,
                   help="separate shard folder scored as the test split (never used for early stopping)")
    p.add_argument("--folds", type=int, default=None,
                   help="stratified K-fold instead of the split column / 80-10-10 split: fold --fold is test, "
                        "the next fold val (used by compare --folds)")
    p.add_argument("--fold", type=int, default=0, help="which fold is the test split with --folds (default 0)")
    p.add_argument("--label-col", default="label", help="label column carried in the shards (default label)")
    p.add_argument("--split-col", default=None,
                   help="train/val/test column in the shards (default: the one recorded at extraction)")
    p.add_argument("--fusion", default="gated", choices=["concat", "gated", "cross_attention"])
    p.add_argument("--text-branch", default="mlp", choices=["mlp", "cnn", "none"])
    p.add_argument("--image-branch", default="mlp", choices=["mlp", "none"])
    p.add_argument("--wide", action=argparse.BooleanOptionalAction, default=True,
                   help="a linear path from the embeddings to the logits beside the MLP (default on)")
    p.add_argument("--input-norm", default="l2", choices=["l2", "none"],
                   help="scale each image embedding to unit length inside the model (default l2)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="plateau", choices=["plateau", "cosine"])
    p.add_argument("--class-weight", default="none", choices=["balanced", "none"],
                   help="balanced: n / (k n_c) per class, for macro F1 on skewed catalogs; default none, which "
                        "measured 0.5-1.5 points more accuracy on fashion and grocery (README)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0, help="Beta(a, a) mixup of the image stream and labels; 0 = off")
    p.add_argument("--modality-dropout", type=float, default=0.5,
                   help="fraction of training items with one stream blanked, half of them the image, half the text "
                        "(default 0.5: the fused model must also classify from either stream alone, so it cannot "
                        "lean on one stream's noise; on grocery +8 points, README)")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs")
    p.add_argument("--ensemble", type=int, default=1,
                   help="train N models (seeds seed..seed+N-1) and save their averaged probabilities as one model")
    p.add_argument("--staged", action="store_true",
                   help="train each branch alone first, then the fusion with a 10x lower rate on the branches")
    p.add_argument("--precision", default="float32", choices=["float32", "mixed_float16"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="run folder (default runs/<embeddings name>-<fusion>)")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")


def resolve_split_col(manifest: dict, split_col_arg: str | None) -> str | None:
    """--split-col if given ('' = none), else the split column recorded at extraction."""
    return manifest["columns"].get("split") if split_col_arg is None else (split_col_arg or None)


def balanced_class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * n_c) for the classes present (k = number of present classes), as scikit-learn's 'balanced'."""
    counts = np.bincount(y, minlength=num_classes)
    present = counts > 0
    k = int(present.sum())
    return {c: float(len(y) / (k * counts[c])) for c in range(num_classes) if present[c]}


@keras.saving.register_keras_serializable(package="prodfuse")
class BranchRateAdam(keras.optimizers.Adam):
    """Adam with a lower learning rate on pre-trained branches (variables of layers named image_* / text_*).

    Adam is invariant to gradient scale, so a lower rate cannot be had by scaling gradients: it must scale the step.
    """

    def __init__(self, branch_rate: float = 0.1, branch_prefixes=("image_", "text_"), **kwargs):
        super().__init__(**kwargs)
        self.branch_rate = branch_rate
        self.branch_prefixes = tuple(branch_prefixes)

    def build(self, var_list):
        super().build(var_list)
        # The backend hands update_step its own variable objects, so remember branch variables by index.
        self._branch_index = {i for i, v in enumerate(var_list)
                              if v.path.split("/")[0].startswith(self.branch_prefixes)}

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._branch_index:
            learning_rate = learning_rate * self.branch_rate
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "branch_rate": self.branch_rate, "branch_prefixes": list(self.branch_prefixes)}


def load_training_data(folder: Path, label_col: str, split_col: str | None, inputs: list[str]) -> dict:
    from .sequence import load_inputs
    manifest = shards.read_manifest(folder)
    extra = [manifest["columns"]["id"], label_col] + ([split_col] if split_col else [])
    try:
        return load_inputs(folder, inputs, extra)
    except ValueError as e:
        raise ValueError(f"{e}. Check --label-col/--split-col, and that the shards hold the streams the model needs "
                         f"(text_embedding is absent when extracted with --text-encoder none: use "
                         f"--text-branch cnn or none).") from None


def load_split_data(emb: Path, label_col: str, split_col_arg: str | None, seed: int, inputs: list[str], *,
                    val_embeddings=None, test_embeddings=None, folds: int | None = None, fold: int = 0) -> dict:
    """The model inputs and labels of every row (main folder, then the validation and test folders if given,
    concatenated) and the row positions of each split in them; see `splits.plan_splits`."""
    from .splits import plan_splits
    split_col = resolve_split_col(shards.read_manifest(emb), split_col_arg)
    use_col = split_col if not (val_embeddings or folds) else None
    parts = {"main": load_training_data(Path(emb), label_col, use_col, inputs)}
    for where, folder in (("val", val_embeddings), ("test", test_embeddings)):
        if folder:
            parts[where] = load_training_data(Path(folder), label_col, None, inputs)
    labels = {k: np.asarray(v[label_col]).astype(str) for k, v in parts.items()}
    plan, too_small, source = plan_splits(
        labels["main"], np.asarray(parts["main"][use_col]) if use_col else None, use_col, seed, folds=folds,
        fold=fold, n_val_folder=len(labels["val"]) if "val" in parts else None,
        n_test_folder=len(labels["test"]) if "test" in parts else None)
    offsets, n = {}, 0
    for k in parts:
        offsets[k], n = n, n + len(labels[k])
    return {"arrays": {i: np.concatenate([parts[k][i] for k in parts]) for i in inputs},
            "labels": np.concatenate([labels[k] for k in parts]),
            "splits": {name: rows + offsets[where] for name, (where, rows) in plan.items()},
            "too_small": too_small, "source": source}


def _callbacks(run: Path, patience: int, schedule: str, verbose: int):
    cbs = [keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience,
                                         restore_best_weights=True, verbose=0),
           keras.callbacks.ModelCheckpoint(str(run / "checkpoint.keras"), monitor="val_accuracy", mode="max",
                                           save_best_only=True, verbose=0),
           keras.callbacks.CSVLogger(str(run / "history.csv"))]
    if schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=5, min_lr=1e-7,
                                                     verbose=0))
    return cbs


def _optimizer(lr: float, schedule: str, epochs: int, steps: int, branch_rate: float | None = None):
    rate = lr
    if schedule == "cosine":
        total = max(epochs * steps, 2)
        warmup = max(1, min(5 * steps, total // 10))
        rate = keras.optimizers.schedules.CosineDecay(initial_learning_rate=lr / 100, decay_steps=total - warmup,
                                                      warmup_target=lr, warmup_steps=warmup)
    if branch_rate is not None:
        return BranchRateAdam(branch_rate=branch_rate, learning_rate=rate, clipnorm=1.0)
    return keras.optimizers.Adam(learning_rate=rate, clipnorm=1.0)


def average_members(members: list) -> keras.Model:
    """One Functional model whose "probs" is the mean of the members' probabilities (saved and loaded as one)."""
    inputs = {t.name: keras.Input(t.shape[1:], dtype=t.dtype, name=t.name) for t in members[0].inputs}
    probs = keras.layers.Average(name="probs")([m(inputs) for m in members])
    return keras.Model(inputs, probs, name=f"prodfuse_ensemble_of_{len(members)}")


def fit_model(model, train_seq, val_seq, args, run: Path, branch_rate=None, epochs=None):
    epochs = epochs or args.epochs
    model.compile(optimizer=_optimizer(args.lr, args.lr_schedule, epochs, len(train_seq), branch_rate),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
                  metrics=["accuracy"])
    verbose = 2 if (args.quiet or not sys.stdout.isatty()) else 1
    return model.fit(train_seq, validation_data=val_seq, epochs=epochs, verbose=verbose,
                     callbacks=_callbacks(run, args.patience, args.lr_schedule, verbose))


def predict_probs(model, arrays: dict, rows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    from .predict import predict_arrays
    return predict_arrays(model, {k: v[rows] for k, v in arrays.items()}, batch_size)


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(history[key], label=f"train {key}")
        if f"val_{key}" in history:
            ax.plot(history[f"val_{key}"], label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_train(args: argparse.Namespace) -> dict:
    import tensorflow as tf

    from .metrics import classification_metrics
    from .model import build_model
    from .sequence import ShardSequence

    emb = Path(args.embeddings or DEMO_EMBEDDINGS)
    if args.embeddings is None and not (emb / shards.MANIFEST).is_file():
        raise ValueError(f"No --embeddings given and the demo shards {str(emb)!r} do not exist yet. "
                         f"Run `python extract_embeddings.py` first (it builds the demo), or pass --embeddings DIR.")
    run = Path(args.out or Path("runs") / f"{emb.name}-{args.fusion if args.image_branch != 'none' and args.text_branch != 'none' else 'unimodal'}")
    run.mkdir(parents=True, exist_ok=True)
    if args.precision == "mixed_float16":
        if not tf.config.list_physical_devices("GPU"):
            raise ValueError("--precision mixed_float16 needs a GPU and none is visible; use --precision float32.")
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()  # repeatable runs on CPU for the same seed

    manifest = shards.read_manifest(emb)
    inputs = (["image"] if args.image_branch == "mlp" else []) + \
             (["text"] if args.text_branch == "mlp" else ["tokens"] if args.text_branch == "cnn" else [])
    if "image" in inputs and manifest["encoders"].get("image", {}).get("views", 1) > 1:
        inputs.append("image_views")
    data = load_split_data(emb, args.label_col, args.split_col, args.seed, inputs,
                           val_embeddings=args.val_embeddings, test_embeddings=getattr(args, "test_embeddings", None),
                           folds=getattr(args, "folds", None), fold=getattr(args, "fold", 0))
    arrays, labels_all, splits = data["arrays"], data["labels"], data["splits"]
    too_small, split_source = data["too_small"], data["source"]
    if getattr(args, "ensemble", 1) < 1 or (getattr(args, "ensemble", 1) > 1 and args.staged):
        raise ValueError(f"--ensemble must be >= 1 and cannot be combined with --staged; got --ensemble "
                         f"{args.ensemble}{' --staged' if args.staged else ''}.")
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise ValueError(f"Need both train and validation rows; got {len(splits['train'])} train and "
                         f"{len(splits['val'])} val from {split_source}.")
    classes = sorted(set(labels_all[splits["train"]].tolist()))
    if len(classes) < 2:
        raise ValueError(f"Need at least 2 classes in the training split; got {classes}.")
    index = {c: i for i, c in enumerate(classes)}
    y_all = np.array([index.get(c, -1) for c in labels_all], dtype=np.int64)
    unseen = {}
    for name in ("val", "test"):
        bad = splits[name][y_all[splits[name]] < 0]
        if len(bad):
            unseen[name] = dict(Counter(labels_all[bad].tolist()))
            splits[name] = splits[name][y_all[splits[name]] >= 0]
    y_train = y_all[splits["train"]]
    class_weight = balanced_class_weights(y_train, len(classes)) if args.class_weight == "balanced" else None
    seq_kw = dict(arrays=arrays, labels=np.maximum(y_all, 0), num_classes=len(classes), batch_size=args.batch_size)
    train_seq = ShardSequence(rows=splits["train"], training=True, class_weight=class_weight, mixup=args.mixup,
                              modality_dropout=args.modality_dropout, seed=args.seed, **seq_kw)
    val_seq = ShardSequence(rows=splits["val"], **seq_kw)

    image_dim = arrays["image"].shape[1] if "image" in arrays else None
    text_dim = arrays["text"].shape[1] if "text" in arrays else None
    build = dict(num_classes=len(classes), image_dim=image_dim, text_dim=text_dim, image_branch=args.image_branch,
                 text_branch=args.text_branch, fusion=args.fusion, wide=getattr(args, "wide", True),
                 input_norm=getattr(args, "input_norm", "l2"))
    t0 = time.perf_counter()
    both = args.image_branch != "none" and args.text_branch != "none"
    if args.staged and both:
        branch_models = []
        for branch in ("image", "text"):
            m = build_model(**{**build, f"{'text' if branch == 'image' else 'image'}_branch": "none"},
                            seed=args.seed)
            names = [t.name for t in m.inputs]
            sub = {k: arrays[k] for k in names + (["image_views"] if "image_views" in arrays and "image" in names
                                                   else [])}
            print(f"stage 1: {branch} branch alone", file=sys.stderr)
            fit_model(m, ShardSequence(**{**seq_kw, "arrays": sub}, rows=splits["train"], training=True,
                                       class_weight=class_weight, seed=args.seed),
                      ShardSequence(**{**seq_kw, "arrays": sub}, rows=splits["val"]), args, run)
            branch_models.append(m)
        model = build_model(**build, seed=args.seed)
        for m in branch_models:
            for layer in m.layers:
                if layer.name not in ("probs", "deep_logits", "wide_logits") and layer.weights:
                    model.get_layer(layer.name).set_weights(layer.get_weights())
        print("stage 2: fusion, branches at 1/10 of the rate", file=sys.stderr)
        history = fit_model(model, train_seq, val_seq, args, run, branch_rate=0.1)
    else:
        members = []
        for i in range(getattr(args, "ensemble", 1)):
            if i:
                print(f"ensemble member {i + 1}: seed {args.seed + i}", file=sys.stderr)
                train_seq = ShardSequence(rows=splits["train"], training=True, class_weight=class_weight,
                                          mixup=args.mixup, modality_dropout=args.modality_dropout,
                                          seed=args.seed + i, **seq_kw)
            m = build_model(**build, seed=args.seed + i,
                            name=f"member_{i}" if getattr(args, "ensemble", 1) > 1 else None)
            history = fit_model(m, train_seq, val_seq, args, run)  # history.csv and curves: the last member's
            members.append(m)
        model = members[0] if len(members) == 1 else average_members(members)
    train_seconds = time.perf_counter() - t0
    # Re-compile with plain Adam so the saved file holds only standard Keras objects besides our layers.
    model.compile(optimizer=keras.optimizers.Adam(args.lr), loss="categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # saved state then matches what loading builds: no warnings
    model.save(run / "model.keras")
    (run / "checkpoint.keras").unlink(missing_ok=True)

    metrics = {}
    for name in ("val", "test"):
        if len(splits[name]):
            probs = predict_probs(model, arrays, splits[name])
            metrics[name] = classification_metrics(y_all[splits[name]], probs)
    hist = history.history
    best_epoch = int(np.argmax(hist["val_accuracy"])) + 1
    (run / "labels.json").write_text(json.dumps(classes, indent=1))
    config = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "embeddings": str(emb.resolve()),
        "val_embeddings": str(Path(args.val_embeddings).resolve()) if args.val_embeddings else None,
        "test_embeddings": str(Path(args.test_embeddings).resolve()) if getattr(args, "test_embeddings", None)
        else None,
        "manifest_sha256": file_sha256(emb / shards.MANIFEST),
        "extraction": {"catalog_path": manifest["catalog_path"], "columns": manifest["columns"],
                       "settings": manifest["settings"], "encoders": manifest["encoders"]},
        "inputs": inputs, "label_col": args.label_col, "num_classes": len(classes),
        "splits": {"source": split_source, **{k: int(len(v)) for k, v in splits.items()},
                   "too_small_for_split": [{"label": c, "items": n} for c, n in too_small],
                   "unseen_labels_excluded": unseen},
        "class_weight": class_weight and {classes[c]: w for c, w in class_weight.items()},
        "best_epoch": best_epoch, "epochs_run": len(hist["loss"]), "train_seconds": round(train_seconds, 1),
    }
    (run / "config.json").write_text(json.dumps(config, indent=1))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(hist, run / "curves.png")
    return {"run": str(run), "metrics": metrics, "best_epoch": best_epoch, "epochs_run": len(hist["loss"]),
            "train_seconds": round(train_seconds, 1), "splits": config["splits"], "model": model.name}


def print_train_summary(result: dict) -> None:
    s = result["splits"]
    print(f"\ntrained {result['model']} in {result['train_seconds']} s: best epoch {result['best_epoch']} of "
          f"{result['epochs_run']} ({s['source']}: {s['train']} train / {s['val']} val / {s['test']} test)")
    for name, m in result["metrics"].items():
        print(f"  {name:5s} accuracy {m['accuracy']:.4f}  top-3 {m['top3_accuracy']:.4f}  weighted F1 "
              f"{m['weighted_f1']:.4f}  macro F1 {m['macro_f1']:.4f}  (n={m['n']})")
    if s["too_small_for_split"]:
        small = ", ".join(f"{d['label']} ({d['items']})" for d in s["too_small_for_split"])
        print(f"  classes too small to split (kept in train only): {small}")
    if s["unseen_labels_excluded"]:
        print(f"  val/test items whose label never occurs in train (not scored): {s['unseen_labels_excluded']}")
    print(f"  run folder: {result['run']}")
