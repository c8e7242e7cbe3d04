"""Training: shards -> splits -> fusion model -> run folder (model, labels, config, history, metrics, curves)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from prodfuse.checks import as_dict
from prodfuse.data import shards
from prodfuse.data.catalog import file_sha256
from prodfuse.encoders.text import VOCAB_SIZE
from prodfuse.modeling.config import LATE_FUSIONS, MONITOR_MODES, TrainConfig, batch_split_message
from prodfuse.modeling.model_card import write_model_card
from prodfuse.modeling.optimizer import make_optimizer
from prodfuse.modeling.run import CONFIG_SCHEMA_VERSION, Run, model_fingerprint, prepare_run_folder
from prodfuse.version import __version__

log = logging.getLogger(__name__)
DEMO_EMBEDDINGS = Path("embeddings") / "demo"


def resolve_split_col(manifest: dict, split_col_arg: str | None) -> str | None:
    """--split-col if given ('' = none), else the split column recorded at extraction."""
    return manifest["columns"].get("split") if split_col_arg is None else (split_col_arg or None)


def balanced_class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * n_c) for the classes present (k = number of present classes), as scikit-learn's 'balanced'."""
    counts = np.bincount(y, minlength=num_classes)
    present = counts > 0
    k = int(present.sum())
    return {c: float(len(y) / (k * counts[c])) for c in range(num_classes) if present[c]}


def load_training_data(folder: Path, label_col: str, split_col: str | None, inputs: list[str]) -> dict:
    from prodfuse.data.sequence import load_inputs

    manifest = shards.read_manifest(folder)
    extra = [manifest["columns"]["id"], label_col] + ([split_col] if split_col else [])
    try:
        return load_inputs(folder, inputs, extra)
    except ValueError as e:
        raise ValueError(
            f"{e}. Check --label-col/--split-col, and that the shards hold the streams the model needs "
            f"(text_embedding is absent when extracted with --text-encoder none: use "
            f"--text-branch cnn or none)."
        ) from None


def load_split_data(
    emb: Path,
    label_col: str,
    split_col_arg: str | None,
    seed: int,
    inputs: list[str],
    *,
    val_embeddings=None,
    test_embeddings=None,
    folds: int | None = None,
    fold: int = 0,
) -> dict:
    """The model inputs and labels of every row (main folder, then the validation and test folders if given,
    concatenated) and the row positions of each split in them; see `splits.plan_labelled_splits`: rows with an empty
    label are in no split, and "unlabelled" counts them."""
    from prodfuse.data.splits import plan_labelled_splits

    split_col = resolve_split_col(shards.read_manifest(emb), split_col_arg)
    use_col = split_col if not val_embeddings else None  # with folds too: its test rows are left out of them
    parts = {"main": load_training_data(Path(emb), label_col, use_col, inputs)}
    for where, folder in (("val", val_embeddings), ("test", test_embeddings)):
        if folder:
            parts[where] = load_training_data(Path(folder), label_col, None, inputs)
    labels = {k: np.asarray(v[label_col]).astype(str) for k, v in parts.items()}
    plan, too_small, source, unlabelled = plan_labelled_splits(
        labels,
        np.asarray(parts["main"][use_col]) if use_col else None,
        use_col,
        seed,
        label_col=label_col,
        folders={"main": emb, "val": val_embeddings, "test": test_embeddings},
        folds=folds,
        fold=fold,
    )
    offsets, n = {}, 0
    for k in parts:
        offsets[k], n = n, n + len(labels[k])
    return {
        "arrays": {i: np.concatenate([parts[k][i] for k in parts]) for i in inputs},
        "labels": np.concatenate([labels[k] for k in parts]),
        "splits": {name: rows + offsets[where] for name, (where, rows) in plan.items()},
        "too_small": too_small,
        "source": source,
        "unlabelled": unlabelled,
    }


def _callbacks(run: Path, patience: int, schedule: str, verbose: int, monitor: str = "val_accuracy"):
    mode = MONITOR_MODES[monitor]
    cbs = [
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=patience, restore_best_weights=True, verbose=0
        ),
        keras.callbacks.ModelCheckpoint(
            str(run / "checkpoint.keras"), monitor=monitor, mode=mode, save_best_only=True, verbose=0
        ),
        keras.callbacks.CSVLogger(str(run / "history.csv")),
    ]
    if schedule == "plateau":
        cbs.append(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=5, min_lr=1e-7, verbose=0)
        )
    return cbs


def average_members(members: list) -> keras.Model:
    """One Functional model whose "probs" is the mean of the members' probabilities (saved and loaded as one)."""
    inputs = {t.name: keras.Input(t.shape[1:], dtype=t.dtype, name=t.name) for t in members[0].inputs}
    probs = keras.layers.Average(name="probs")([m(inputs) for m in members])
    return keras.Model(inputs, probs, name=f"prodfuse_ensemble_of_{len(members)}")


def fit_model(model, train_seq, val_seq, config: TrainConfig, run: Path, branch_rate=None, epochs=None):
    epochs = epochs or config.epochs
    model.compile(
        optimizer=make_optimizer(
            config.lr,
            config.lr_schedule,
            epochs,
            len(train_seq),
            branch_rate,
            config.weight_decay,
            replicas=model.distribute_strategy.num_replicas_in_sync,  # the strategy the model was built under
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return model.fit(
        train_seq,
        validation_data=val_seq,
        epochs=epochs,
        verbose=config.verbose,
        callbacks=_callbacks(run, config.patience, config.lr_schedule, config.verbose, config.monitor),
    )


def predict_probs(model, arrays: dict, rows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    from prodfuse.modeling.probabilities import predict_arrays

    return predict_arrays(model, {k: v[rows] for k, v in arrays.items()}, batch_size)


def _stream_metrics(model, alone_models: dict, arrays: dict, y_all: np.ndarray, splits: dict) -> dict:
    """Val/test metrics of each stream alone, for the model card beside the fused model's: a product fusion's own
    single-stream models (ensemble: their mean), else the fused model with the other stream zeroed, as `evaluate`'s
    ablation does."""
    from prodfuse.modeling.metrics import classification_metrics
    from prodfuse.modeling.probabilities import zero_stream

    out = {"how": "its own model, trained alone" if alone_models["image"] else "the fused model, other stream zeroed"}
    for stream, other in (("image", "text"), ("text", "image")):
        out[stream] = {}
        for name in ("val", "test"):
            rows = splits[name]
            if not len(rows):
                continue
            if alone_models[stream]:
                probs = np.mean([predict_probs(m, sub, rows) for m, sub in alone_models[stream]], axis=0)
            else:  # zero the split's rows only: a copy of every row's arrays would double the memory
                sub = zero_stream({k: v[rows] for k, v in arrays.items()}, other)
                probs = predict_probs(model, sub, np.arange(len(rows)))
            out[stream][name] = classification_metrics(y_all[rows], probs)
    return out


def _best_epoch(history: dict, config: TrainConfig) -> int:
    best = np.argmin if MONITOR_MODES[config.monitor] == "min" else np.argmax
    return int(best(history[config.monitor])) + 1


def _stream_history(run: Path, *streams: str) -> None:
    """run/history.csv: every stream's epochs, a `stream` column first; each stream's own files stay in its folder."""
    import pandas as pd

    frames = []
    for name in streams:
        frame = pd.read_csv(run / name / "history.csv")
        frame.insert(0, "stream", name)
        frames.append(frame)
    pd.concat(frames).to_csv(run / "history.csv", index=False)


def _level_metrics(hierarchy: tuple, probs, classes, y_all, rows, labels_all) -> dict:
    """metrics.json's per-level, consistency and back-off figures of one split (modeling/hierarchy.py)."""
    from prodfuse.modeling.hierarchy import hierarchy_metrics

    tree, values = hierarchy
    if len(values[tree.leaf_level]) != len(labels_all):  # both read every row of the same folders, in order
        raise ValueError(f"the shards changed while training read them ({tree.leaf_level!r} rows differ); train again")
    return hierarchy_metrics(tree, probs, classes, y_all[rows], {c: v[rows] for c, v in values.items()})


def plot_curves(history: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend or figure registry

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
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


def default_run_folder(config: TrainConfig) -> Path:
    """runs/<embeddings name>-<fusion>, or -2, -3, ... after it: without --out each run gets its own folder (an
    explicit --out that exists is refused unless overwrite)."""
    emb = Path(config.embeddings or DEMO_EMBEDDINGS)
    base = Path("runs") / f"{emb.name}-{config.fusion if config.both_streams else 'unimodal'}"
    path, k = base, 1
    while path.exists() and not config.overwrite and any(path.iterdir()):
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def synchronize_batch_norm(model: keras.Model) -> keras.Model:
    """Every BatchNormalization layer of `model` takes its batch statistics over the global batch, all replicas
    together, as one device does, instead of over its replica's share. Unsynchronised, each replica's moving
    statistics follow its own batch_size / replicas items and the saved model keeps the first replica's: on the demo
    the validation loss then levelled off higher than one device's. Costs three small all-reduces per layer and step;
    without a strategy (prediction) the layers compute as before."""
    for layer in model._flatten_layers(include_self=False):  # the fusion layers' own BatchNormalization too
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
    return model


# One MirroredStrategy per set of devices for the life of the process. Each new MirroredStrategy numbers its collective
# operations from the start again, so a second one over the same devices (a second `train` in one process) reuses
# the first one's keys and its all-reduces fail with "Shape mismatch in the collective instance 100"
# (tensorflow/tensorflow#62790); one strategy, reused, keeps counting.
_MIRRORED: dict = {}


def _device_kind(name: str) -> tuple:
    """("GPU", 0) from "/gpu:0", "/device:GPU:0" or "/job:localhost/replica:0/task:0/device:GPU:0"."""
    import tensorflow as tf

    try:
        spec = tf.DeviceSpec.from_string(name)
    except ValueError:
        return (name,)
    return ((spec.device_type or "").upper(), spec.device_index)


def distribution_strategy(config: TrainConfig):
    """None for strategy "default" (Keras' own single device); for "mirrored" the tf.distribute.MirroredStrategy over
    `config.devices` (None: every visible GPU, or the CPU when there is none), whose replicas share the global batch
    evenly: one per set of devices and process (see _MIRRORED). Making it initialises TensorFlow's devices; it
    changes nothing else in the process."""
    if config.strategy == "default":
        return None
    import tensorflow as tf

    visible = [d.name for d in tf.config.list_logical_devices()]
    if config.devices:  # TensorFlow would quietly place a device it does not have on another one
        kinds = {_device_kind(name) for name in visible}
        missing = [d for d in config.devices if _device_kind(d) not in kinds]
        if missing:
            raise ValueError(f"devices {missing} are not visible to TensorFlow; visible: {visible}")
    try:
        fresh = tf.distribute.MirroredStrategy(devices=list(config.devices) if config.devices else None)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"Cannot mirror over devices {config.devices}: {e}. Visible devices: {visible}.") from None
    # Keyed by the devices as TensorFlow names them: "/gpu:0" and "/device:GPU:0", or no list and the same GPUs, match.
    strategy = _MIRRORED.setdefault(tuple(fresh.extended.worker_devices), fresh)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(batch_split_message(config.batch_size, replicas))
    log.info(
        "mirrored over %d replica(s) %s: global batch %d, %d per replica",
        replicas,
        list(strategy.extended.worker_devices),
        config.batch_size,
        config.batch_size // replicas,
    )
    return strategy


def train(config: TrainConfig) -> Run:
    """Train the model `config` describes on its shards and save it as a run folder; returns the loaded Run
    (its `metrics` hold the val/test metrics, its `config` what config.json holds).

    The random seeds are set from `config.seed`: that is the one process-wide change a repeatable run needs
    (Keras draws its initial weights from the global generators). The dtype policy is restored on return. With
    `config.strategy` "mirrored" the model is built, fitted and saved under a MirroredStrategy's scope (see
    `distribution_strategy`), with BatchNormalization synchronised and clipping on the summed gradient.
    """
    import tensorflow as tf

    emb = Path(config.embeddings or DEMO_EMBEDDINGS)
    if config.embeddings is None and not (emb / shards.MANIFEST).is_file():
        raise ValueError(
            f"No --embeddings given and the demo shards {str(emb)!r} do not exist yet. "
            f"Run `python extract_embeddings.py` first (it builds the demo), or pass --embeddings DIR."
        )
    manifest = shards.read_manifest(emb)  # a clear error before anything is written
    if config.label_col is None:  # the label column recorded at extraction
        config = dataclasses.replace(config, label_col=manifest["columns"].get("label") or "label")
    if config.precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise ValueError("precision mixed_float16 needs a GPU and none is visible; use --precision float32.")
    strategy = distribution_strategy(config)  # an unusable device or batch split fails before the folder is made
    hierarchy = None
    if config.label_cols:  # learned before the folder is made: a missing column or a bad tree writes nothing
        from prodfuse.modeling.hierarchy import hierarchy_from_shards

        hierarchy = hierarchy_from_shards(
            [emb, config.val_embeddings, config.test_embeddings], config.label_cols, config.label_parents
        )
    run = prepare_run_folder(config.out or default_run_folder(config), config.overwrite)
    previous_policy = keras.config.dtype_policy()
    if config.precision == "mixed_float16":
        keras.config.set_dtype_policy("mixed_float16")
    try:
        # Under a strategy's scope every model, optimizer and variable is made per replica, and fit/predict split
        # each batch of the same Sequence feed between the replicas.
        with strategy.scope() if strategy else contextlib.nullcontext():
            return _train(config, emb, manifest, run, strategy.num_replicas_in_sync if strategy else 1, hierarchy)
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _train(config: TrainConfig, emb: Path, manifest: dict, run: Path, replicas: int = 1, hierarchy=None) -> Run:
    """`hierarchy`: (the tree, the level columns of every row in load_split_data's order) or None."""
    from prodfuse.data.sequence import ShardSequence
    from prodfuse.modeling.metrics import classification_metrics
    from prodfuse.modeling.model import build_model as build_one

    def build_model(**kwargs):
        model = build_one(**kwargs)
        return synchronize_batch_norm(model) if replicas > 1 else model

    keras.utils.set_random_seed(config.seed)
    inputs = (["image"] if config.image_branch == "mlp" else []) + (
        ["text"] if config.text_branch == "mlp" else ["tokens"] if config.text_branch == "cnn" else []
    )
    if "image" in inputs and manifest["encoders"].get("image", {}).get("views", 1) > 1:
        inputs.append("image_views")
    data = load_split_data(
        emb,
        config.label_col,
        config.split_col,
        config.seed,
        inputs,
        val_embeddings=config.val_embeddings,
        test_embeddings=config.test_embeddings,
        folds=config.folds,
        fold=config.fold,
    )
    arrays, labels_all, splits = data["arrays"], data["labels"], data["splits"]
    too_small, split_source = data["too_small"], data["source"]
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise ValueError(
            f"Need both train and validation rows; got {len(splits['train'])} train and "
            f"{len(splits['val'])} val from {split_source}."
        )
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
    class_weight = balanced_class_weights(y_train, len(classes)) if config.class_weight == "balanced" else None
    seq_kw = dict(arrays=arrays, labels=np.maximum(y_all, 0), num_classes=len(classes), batch_size=config.batch_size)

    def train_sequence(seed: int) -> ShardSequence:
        return ShardSequence(
            rows=splits["train"],
            training=True,
            class_weight=class_weight,
            mixup=config.mixup,
            modality_dropout=config.modality_dropout,
            seed=seed,
            **seq_kw,
        )

    train_seq = train_sequence(config.seed)
    val_seq = ShardSequence(rows=splits["val"], **seq_kw)

    image_dim = arrays["image"].shape[1] if "image" in arrays else None
    text_dim = arrays["text"].shape[1] if "text" in arrays else None
    build = dict(
        num_classes=len(classes),
        image_dim=image_dim,
        text_dim=text_dim,
        image_branch=config.image_branch,
        text_branch=config.text_branch,
        fusion=config.fusion,
        wide=config.wide,
        input_norm=config.input_norm,
    )
    if "tokens" in arrays:  # the token ids' range and length as extraction recorded them
        tokens = manifest["encoders"].get("tokens", {})
        build.update(vocab_size=int(tokens.get("vocab_size") or VOCAB_SIZE), seq_len=int(arrays["tokens"].shape[1]))
    t0 = time.perf_counter()
    both = config.image_branch != "none" and config.text_branch != "none"
    streams = {}  # product fusion: what each single-stream model and the weight fit gave
    late = {}  # stack or joint fusion: each member's streams' best epochs, the stack's out-of-fold figures
    alone_models = {"image": [], "text": []}  # product fusion: each stream's own (model, inputs), one per member

    def train_alone(branch: str, seed: int, folder: Path, rows=None):
        """The model of one stream alone (the other branch off), fitted on that stream's inputs (on `rows`, else
        the training split), stopped early on the validation split."""
        m = build_model(**{**build, f"{'text' if branch == 'image' else 'image'}_branch": "none"}, seed=seed)
        names = [t.name for t in m.inputs]
        sub = {k: arrays[k] for k in names + (["image_views"] if "image_views" in arrays and "image" in names else [])}
        folder.mkdir(parents=True, exist_ok=True)
        hist = fit_model(
            m,
            ShardSequence(
                **{**seq_kw, "arrays": sub},
                rows=splits["train"] if rows is None else rows,
                training=True,
                class_weight=class_weight,
                seed=seed,
            ),
            ShardSequence(**{**seq_kw, "arrays": sub}, rows=splits["val"]),
            config,
            folder,
        )
        return m, hist, sub

    def fit_stack(fit_alone, subs: dict, seed: int, folder: Path):
        """The meta-classifier of fusion "stack": each stream refitted on K-1 folds of the training rows scores the
        K-th (out-of-fold probabilities of every training row), then a logistic regression on both streams'
        log-probabilities. Returns (kernel, bias, info)."""
        import shutil

        from prodfuse.modeling.experts import present
        from prodfuse.modeling.stacking import fit_meta, oof_folds, stack_features

        train_rows = splits["train"]
        folds = oof_folds(y_all[train_rows], config.stack_folds, seed)
        oof = {b: np.zeros((len(train_rows), len(classes)), dtype=np.float32) for b in ("image", "text")}
        for k, held in enumerate(folds):
            fit_rows = np.setdiff1d(np.arange(len(train_rows)), held)
            for branch in ("image", "text"):
                log.info("stack: %s stream, fold %d of %d", branch, k + 1, len(folds))
                m, _, _ = fit_alone(branch, seed + 1000 * (k + 1), folder / f"{branch}_{k}", train_rows[fit_rows])
                oof[branch][held] = predict_probs(m, subs[branch], train_rows[held])
        image_there = present(subs["image"]["image"][train_rows])
        text_there = present(next(iter(subs["text"].values()))[train_rows])
        features = stack_features(oof["image"], oof["text"], image_there, text_there)
        kernel, bias = fit_meta(features, y_all[train_rows], len(classes), seed)
        shutil.rmtree(folder, ignore_errors=True)  # the fold models are not kept: only their probabilities served
        info = {
            "folds": len(folds),
            "oof_accuracy": {b: float(np.mean(oof[b].argmax(axis=1) == y_all[train_rows])) for b in ("image", "text")},
        }
        return kernel, bias, info

    def fit_probe_expert(seed: int):
        """The linear probe on [L2(image); L2(text)] of the training rows, every stored view of each photo."""
        from prodfuse.data.sequence import view_count, with_view
        from prodfuse.modeling.experts import probe_model

        rows = splits["train"]
        sub = {k: arrays[k][rows] for k in ("image", "image_views") if k in arrays}
        views = [with_view(sub, v)["image"] for v in range(view_count(sub))]
        return probe_model(views, arrays["text"][rows], y_all[rows], len(classes), seed=seed)

    def fit_joint(m_img, m_txt, seed: int, folder: Path, name=None):
        """Fusion "joint": both stream models frozen, a head on their vectors and logits trained on the training
        split, stopped early on validation."""
        from prodfuse.modeling.stacking import joint_model

        joint = joint_model(m_img, m_txt, seed=seed, name=name)
        sub = {
            k: arrays[k] for k in [t.name for t in joint.inputs] + (["image_views"] if "image_views" in arrays else [])
        }
        folder.mkdir(parents=True, exist_ok=True)
        hist = fit_model(
            joint,
            ShardSequence(
                **{**seq_kw, "arrays": sub}, rows=splits["train"], training=True, class_weight=class_weight, seed=seed
            ),
            ShardSequence(**{**seq_kw, "arrays": sub}, rows=splits["val"]),
            config,
            folder,
        )
        (folder / "checkpoint.keras").unlink(missing_ok=True)
        return joint, hist

    if config.fusion in LATE_FUSIONS and both:
        from prodfuse.modeling.experts import fit_product_weights, present, product_model
        from prodfuse.modeling.stacking import stack_model

        members = []
        for i in range(config.ensemble):
            seed = config.seed + i
            fitted, folders = {}, {b: run / (b if not i else f"{b}_{i}") for b in ("image", "text")}
            for branch in ("image", "text"):
                log.info("%s stream alone%s", branch, f" (ensemble member {i + 1}, seed {seed})" if i else "")
                fitted[branch] = train_alone(branch, seed, folders[branch])
                plot_curves(fitted[branch][1].history, folders[branch] / "curves.png")
                (folders[branch] / "checkpoint.keras").unlink(missing_ok=True)
            (m_img, h_img, sub_img), (m_txt, h_txt, sub_txt) = fitted["image"], fitted["text"]
            if config.fusion == "product":
                val = splits["val"]
                # each model's validation probabilities as prediction makes them (the image's averaged over its views)
                p_image, p_text = predict_probs(m_img, sub_img, val), predict_probs(m_txt, sub_txt, val)
                probe, p_probe = None, None
                if config.uses_probe_expert:
                    log.info("linear probe expert: logistic regression on both embeddings")
                    probe = fit_probe_expert(seed)
                    p_probe = predict_probs(probe, {k: v for k, v in arrays.items() if k != "tokens"}, val)
                a, b, *c, info = fit_product_weights(
                    y_all[val],
                    p_image,
                    p_text,
                    present(sub_img["image"][val]),
                    present(next(iter(sub_txt.values()))[val]),
                    p_probe,
                )
                log.info(
                    "product fusion weights: image %.3g, text %.3g%s (validation log-loss %.4f; image alone %.4f, "
                    "text alone %.4f)",
                    a,
                    b,
                    f", probe {c[0]:.3g}" if c else "",
                    info["product"]["logloss"],
                    info["image"]["logloss"],
                    info["text"]["logloss"],
                )
            best = {"image": _best_epoch(h_img.history, config), "text": _best_epoch(h_txt.history, config)}
            key, member_name = f"member_{i}" if i else "fit", f"member_{i}" if config.ensemble > 1 else None
            if config.fusion == "product":
                streams[key] = {**info, "best_epoch": best}
                members.append(product_model(m_img, m_txt, a, b, member_name, probe, c[0] if c else None))
            elif config.fusion == "stack":
                kernel, bias, stacked = fit_stack(
                    train_alone, {"image": sub_img, "text": sub_txt}, seed, run / (f"oof_{i}" if i else "oof")
                )
                late[key] = {**stacked, "best_epoch": best}
                members.append(stack_model(m_img, m_txt, kernel, bias, name=member_name))
            else:
                joint, h_joint = fit_joint(m_img, m_txt, seed, run / (f"joint_{i}" if i else "joint"), member_name)
                late[key] = {"best_epoch": {**best, "joint": _best_epoch(h_joint.history, config)}}
                members.append(joint)
            alone_models["image"].append((m_img, sub_img))
            alone_models["text"].append((m_txt, sub_txt))
            if not i:
                history = h_img  # best_epoch and curves.png: the first member's image stream
        model = members[0] if len(members) == 1 else average_members(members)
        _stream_history(run, "image", "text", *(["joint"] if config.fusion == "joint" else []))
    elif config.staged and both:
        branch_models = []
        for branch in ("image", "text"):
            log.info("stage 1: %s branch alone", branch)
            branch_models.append(train_alone(branch, config.seed, run)[0])
        model = build_model(**build, seed=config.seed)
        for m in branch_models:
            for layer in m.layers:
                if layer.name not in ("probs", "deep_logits", "wide_logits") and layer.weights:
                    model.get_layer(layer.name).set_weights(layer.get_weights())
        log.info("stage 2: fusion, branches at 1/10 of the rate")
        history = fit_model(model, train_seq, val_seq, config, run, branch_rate=0.1)
    else:
        members = []
        for i in range(config.ensemble):
            if i:
                log.info("ensemble member %d: seed %d", i + 1, config.seed + i)
                train_seq = train_sequence(config.seed + i)
            m = build_model(**build, seed=config.seed + i, name=f"member_{i}" if config.ensemble > 1 else None)
            history = fit_model(m, train_seq, val_seq, config, run)  # history.csv and curves: the last member's
            members.append(m)
        model = members[0] if len(members) == 1 else average_members(members)
    train_seconds = time.perf_counter() - t0
    # Re-compile with plain Adam so the saved file holds only standard Keras objects besides our layers.
    model.compile(optimizer=keras.optimizers.Adam(config.lr), loss="categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # saved state then matches what loading builds: no warnings
    model.save(run / "model.keras")
    (run / "checkpoint.keras").unlink(missing_ok=True)

    metrics = {}
    for name in ("val", "test"):
        if len(splits[name]):
            probs = predict_probs(model, arrays, splits[name])
            metrics[name] = classification_metrics(y_all[splits[name]], probs)
            if hierarchy:
                metrics[name].update(_level_metrics(hierarchy, probs, classes, y_all, splits[name], labels_all))
    stream_metrics = _stream_metrics(model, alone_models, arrays, y_all, splits) if both else None
    hist = history.history
    best_epoch = _best_epoch(hist, config)
    (run / "labels.json").write_text(json.dumps(classes, indent=1))
    if hierarchy:
        from prodfuse.modeling.hierarchy import save_hierarchy

        save_hierarchy(run, hierarchy[0])
    record = {
        "schema_version": CONFIG_SCHEMA_VERSION,
        "versions": {"prodfuse": __version__},
        "train": as_dict(config),
        "model_sha256": model_fingerprint(run),
        "embeddings": str(emb.resolve()),
        "val_embeddings": str(Path(config.val_embeddings).resolve()) if config.val_embeddings else None,
        "test_embeddings": str(Path(config.test_embeddings).resolve()) if config.test_embeddings else None,
        "manifest_sha256": file_sha256(emb / shards.MANIFEST),
        "extraction": {
            "catalog_path": manifest["catalog_path"],
            "columns": manifest["columns"],
            "settings": manifest["settings"],
            "encoders": manifest["encoders"],
        },
        "inputs": inputs,
        "label_col": config.label_col,
        "num_classes": len(classes),
        "splits": {
            "source": split_source,
            **{k: int(len(v)) for k, v in splits.items()},
            "too_small_for_split": [{"label": c, "items": n} for c, n in too_small],
            "unlabelled_rows": data["unlabelled"],  # an empty label: in no split (`evaluate` plans as train did)
            "unseen_labels_excluded": unseen,
        },
        "class_weight": class_weight and {classes[c]: w for c, w in class_weight.items()},
        "best_epoch": best_epoch,
        "epochs_run": len(hist["loss"]),
        "train_seconds": round(train_seconds, 1),
        "replicas": replicas,  # model copies that shared each batch (strategy and devices: under "train")
        # product fusion: the fitted weights, each stream's validation score and best epoch (best_epoch above and
        # curves.png are the image stream's; history.csv has both, image/ and text/ each stream's own files)
        "product_fusion": streams or None,
        # fusion stack or joint: per member ("fit" the first) the streams' (and the joint head's) best epochs, and a
        # stack's folds and its streams' out-of-fold accuracy on the training rows
        "late_fusion": late or None,
        # per split, the items of each class: the model card's known limits (few training items, absent classes)
        "class_counts": {
            name: {c: int(n) for c, n in sorted(Counter(labels_all[rows].tolist()).items())}
            for name, rows in splits.items()
        },
    }
    (run / "config.json").write_text(json.dumps(record, indent=1))
    (run / "metrics.json").write_text(
        json.dumps(
            {
                **metrics,
                **({"streams": stream_metrics} if stream_metrics else {}),
                "model_sha256": record["model_sha256"],
            },
            indent=1,
        )
    )
    plot_curves(hist, run / "curves.png")
    write_model_card(run)  # last: it reads the files above
    return Run(
        path=run,
        model=model,
        classes=classes,
        config=record,
        fingerprint=record["model_sha256"],
        metrics=metrics,
        hierarchy=hierarchy[0] if hierarchy else None,
    )
