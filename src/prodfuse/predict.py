"""Prediction: a run's model on shards (or on a new catalog, embedded exactly like the run's training data).

Also the forward pass that `evaluate` shares, so both commands give the same probabilities for the same item:
calibrated top-k labels, and how much each stream (image, text) contributed to the decision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from . import shards
from .calibration import apply_temperature, load_temperature
from .catalog import add_column_args, file_sha256

# Model inputs that make up each stream; zeroing a stream zeroes all of its inputs (text: vector or token ids).
STREAMS = {"image": ("image", "image_views"), "text": ("text", "tokens")}


def load_run(run: str | Path) -> dict:
    """The run folder's model (loaded without its optimizer), class names and config."""
    import keras

    import prodfuse.fusion  # noqa: F401  (registers the fusion layers for loading)

    run = Path(run)
    missing = [f for f in ("model.keras", "labels.json", "config.json") if not (run / f).is_file()]
    if missing:
        raise ValueError(f"{str(run)!r} is not a complete run folder: it lacks {missing}. Pass --run the --out "
                         f"folder of `python train_multimodal_mlp.py`.")
    model = keras.models.load_model(run / "model.keras", compile=False)
    classes = json.loads((run / "labels.json").read_text())
    config = json.loads((run / "config.json").read_text())
    return {"path": run, "model": model, "classes": [str(c) for c in classes], "config": config,
            "inputs": list(config["inputs"])}


def shard_columns(folder: str | Path) -> list[str]:
    """Column names of a shard folder (empty when every row was rejected and no shard holds rows)."""
    import pyarrow.parquet as pq
    paths = shards.shard_paths(folder)
    return list(pq.read_schema(paths[0]).names) if paths else []


def read_items(folder: str | Path, inputs: list[str], extra: list[str] = (), rows=None) -> dict[str, np.ndarray]:
    """Model inputs (keyed by input name) and extra columns (keyed by column name) of the chosen rows."""
    from .sequence import INPUT_COLUMNS  # imports keras: only when data is read, not for `prodfuse --help`
    cols = [INPUT_COLUMNS[i] for i in inputs] + [c for c in dict.fromkeys(extra) if c not in INPUT_COLUMNS.values()]
    data = shards.read_shards(folder, cols, rows)
    return {**{i: data[INPUT_COLUMNS[i]] for i in inputs}, **{c: data[c] for c in extra}}


def zero_stream(arrays: dict[str, np.ndarray], stream: str) -> dict[str, np.ndarray]:
    """A copy of the model inputs with one stream blanked: image -> zero vector, text -> zero vector / all padding."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {list(STREAMS)}; got {stream!r}")
    return {k: (np.zeros_like(v) if k in STREAMS[stream] else v) for k, v in arrays.items()}


def has_stream(arrays: dict, stream: str) -> bool:
    return any(k in arrays for k in STREAMS[stream])


def predict_arrays(model, arrays: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities [n, classes] of `model` on the input arrays (one key per model input)."""
    from .sequence import view_count, with_view
    n = len(next(iter(arrays.values())))
    if n == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    # Test-time augmentation: the mean of the probabilities over every stored view of the photo.
    views = view_count(arrays)
    return np.mean([np.asarray(model.predict(with_view(arrays, v), batch_size=batch_size, verbose=0))
                    for v in range(views)], axis=0)


def gate_values(model, arrays: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray | None:
    """Per-item mean of the gated fusion's gate (image share, in [0, 1]); None for models without a gate."""
    from .model import gate_model
    if not hasattr(model, "get_layer"):
        return None
    gm = gate_model(model)
    if gm is None:
        return None
    n = len(next(iter(arrays.values())))
    if n == 0:
        return np.zeros(0)
    from .sequence import with_view
    g = np.asarray(gm.predict(with_view(arrays, 0), batch_size=batch_size, verbose=0))  # the whole photo's gate
    return g.reshape(n, -1).mean(axis=1)


def forward(model, arrays: dict[str, np.ndarray], temperature: float = 1.0, batch_size: int = 1024,
            ablate: bool = True) -> dict:
    """Everything both `evaluate` and `predict` need from the model, computed once.

    Returns raw (softmax) and calibrated probabilities, the calibrated probabilities with the image stream zeroed
    (`no_image`) and with the text stream zeroed (`no_text`), None for a stream the model does not take, and the
    per-item gate (None unless gated fusion).
    """
    raw = predict_arrays(model, arrays, batch_size)
    out = {"raw": raw, "probs": apply_temperature(raw, temperature) if len(raw) else raw.astype(np.float64),
           "temperature": float(temperature)}
    for stream in STREAMS:
        p = None
        if ablate and has_stream(arrays, stream):
            p = predict_arrays(model, zero_stream(arrays, stream), batch_size)
            p = apply_temperature(p, temperature) if len(p) else p.astype(np.float64)
        out[f"no_{stream}"] = p
    out["gate"] = gate_values(model, arrays, batch_size)
    out["wide"] = any(layer.name == "wide_logits" for layer in getattr(model, "layers", []))
    return out


def contributions(out: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) contribution per item; NaN for a stream the model does not take.

    Gated fusion without the wide path: the mean gate and 1 - gate (each stream's share of the fused vector).
    Otherwise (the gate then decides only the MLP's part): how much the top class's probability drops when that
    stream is zeroed (can be negative when the stream argued against it).
    """
    probs = out["probs"]
    n = len(probs)
    if out.get("gate") is not None and not out.get("wide"):
        return out["gate"].astype(np.float64), 1.0 - out["gate"].astype(np.float64)
    top = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
    res = []
    for stream in STREAMS:
        zeroed = out.get(f"no_{stream}")
        if zeroed is None:
            res.append(np.full(n, np.nan))
        else:
            res.append(probs[np.arange(n), top] - zeroed[np.arange(n), top])
    return res[0], res[1]


def prediction_table(ids, probs: np.ndarray, classes: list[str], k: int, image_contribution=None,
                     text_contribution=None, id_col: str = "product_id", true_labels=None,
                     label_col: str = "label"):
    """One row per item: id, [true label], label_1, prob_1, ..., label_k, prob_k, image/text contribution."""
    import pandas as pd

    k = max(1, min(int(k), len(classes)))
    n = len(probs)
    # Stable sort on -p: ties go to the lower class index, as argmax does.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k] if n else np.zeros((0, k), np.int64)
    cols = {id_col: np.asarray(ids, dtype=object)}
    if true_labels is not None:
        cols[label_col] = np.asarray(true_labels, dtype=object)
    names = np.asarray(classes, dtype=object)
    for j in range(k):
        cols[f"label_{j + 1}"] = names[order[:, j]] if n else np.zeros(0, object)
        cols[f"prob_{j + 1}"] = np.round(probs[np.arange(n), order[:, j]], 6) if n else np.zeros(0)
    for name, v in (("image_contribution", image_contribution), ("text_contribution", text_contribution)):
        cols[name] = np.round(np.asarray(v, dtype=np.float64), 6) if v is not None else np.full(n, np.nan)
    return pd.DataFrame(cols)


def check_compatible(config: dict, manifest: dict, folder: str | Path) -> None:
    """Stop when shards were made with another backbone or text encoder than the run's training data."""
    trained = config["extraction"]["encoders"]
    got = manifest.get("encoders", {})
    for stream, key in (("image", "backbone"), ("image", "dim"), ("text", "kind"), ("text", "dim")):
        a, b = trained.get(stream, {}).get(key), got.get(stream, {}).get(key)
        if a != b:
            raise ValueError(f"Shards {str(folder)!r} were made with {stream} {key} {b!r} but the run was trained on "
                             f"{a!r}. Embed the data like the run's: `prodfuse predict --catalog CSV` does it, or "
                             f"`python extract_embeddings.py --like {config['embeddings']}`.")
    # A tfidf encoder fitted on other texts gives vectors in another basis: same width, meaningless numbers.
    same = Path(folder).resolve() == Path(config["embeddings"]).resolve()
    like = manifest.get("settings", {}).get("like")
    if trained.get("text", {}).get("kind") == "tfidf" and not same and \
            (like is None or Path(like).resolve() != Path(config["embeddings"]).resolve()):
        print(f"warning: {folder} was not extracted with --like {config['embeddings']}; its tfidf text encoder "
              f"may be fitted on other texts than the run's, which makes the text stream meaningless.",
              file=sys.stderr)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by train")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalog", help="new catalog (CSV/parquet/JSONL): embedded like the run's training data")
    src.add_argument("--embeddings", help="shard folder already embedded like the run's training data")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--top-k", type=int, default=3, help="labels per item (default 3)")
    p.add_argument("--work", default=None,
                   help="shard folder for the embedded catalog (default <out without .csv>.embeddings/)")
    p.add_argument("--batch-size", type=int, default=1024, help="items per model batch")
    p.add_argument("--ocr-workers", type=int, default=None, help="OCR processes (default: number of cores)")
    p.add_argument("--ocr-cache", default=None, help="OCR cache folder (default ~/.cache/prodfuse/ocr)")
    add_column_args(p)
    # No text-cols default: `--like` brings the run's text columns, and an explicit value must agree with them.
    p.set_defaults(text_cols=None)


def embed_catalog(args: argparse.Namespace, config: dict, work: Path) -> dict:
    """Run `prodfuse extract --like <run's embeddings>` on the catalog into `work`; returns extract's summary."""
    from .catalog import Columns, read_catalog
    from .cli import build_parser
    from .extract import run_extract

    like = Path(config["embeddings"])
    if not (like / shards.MANIFEST).is_file():
        raise ValueError(f"The run's training shards {str(like)!r} (config.json 'embeddings') are gone; predict "
                         f"--catalog needs them for the fitted text encoder and settings. Restore them, or embed "
                         f"the catalog yourself and pass --embeddings DIR.")
    # The label column is optional for prediction: tell extract there is none when the catalog lacks it.
    label = args.label_col or ""
    if label:
        df = read_catalog(args.catalog, Columns(id=args.id_col, image=args.image_col, text=(), label=None,
                                                split=None), require_label=False)
        if label not in df.columns:
            label = ""
    argv = ["extract", "--catalog", str(args.catalog), "--out", str(work), "--like", str(like), "--no-progress",
            "--id-col", args.id_col, "--image-col", args.image_col, "--label-col", label,
            "--split-col", args.split_col or ""]
    if args.text_cols is not None:
        argv += ["--text-cols", args.text_cols]
    if args.ocr_workers is not None:
        argv += ["--ocr-workers", str(args.ocr_workers)]
    if args.ocr_cache:
        argv += ["--ocr-cache", args.ocr_cache]
    # Our own work folder: resume when it holds this very catalog embedded like this run, else start over.
    if (work / shards.MANIFEST).is_file():
        old = shards.read_manifest(work)
        if old.get("catalog_sha256") != file_sha256(args.catalog) or \
                old.get("settings", {}).get("like") != str(like.resolve()):
            argv.append("--overwrite")
    ext_args = build_parser().parse_args(argv)
    return run_extract(ext_args)


def run_predict(args: argparse.Namespace) -> dict:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1; got {args.top_k}")
    out_path = Path(args.out)
    if out_path.is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; pass a CSV file path such as {args.out}/predictions.csv")
    run = load_run(args.run)
    config = run["config"]
    temperature, fitted = load_temperature(run["path"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rejects_out = out_path.with_name(out_path.stem + "_rejects.csv")
    if args.catalog:
        folder = Path(args.work) if args.work else out_path.with_name(out_path.stem + ".embeddings")
        embed_catalog(args, config, folder)
        shutil.copyfile(folder / shards.REJECTS, rejects_out)
    else:
        folder = Path(args.embeddings)
    manifest = shards.read_manifest(folder)
    check_compatible(config, manifest, folder)
    n_rejected = len(shards.all_rejects(manifest))

    id_col = manifest["columns"]["id"]
    label_col = config["label_col"]
    present = shard_columns(folder)
    with_label = label_col in present
    data = read_items(folder, run["inputs"], [id_col] + ([label_col] if with_label else []))
    arrays = {k: data[k] for k in run["inputs"]}
    res = forward(run["model"], arrays, temperature, args.batch_size)
    img_c, txt_c = contributions(res)
    table = prediction_table(data[id_col], res["probs"], run["classes"], args.top_k, img_c, txt_c, id_col=id_col,
                             true_labels=data[label_col] if with_label else None, label_col=label_col)
    tmp = out_path.with_name(out_path.name + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out_path)

    n = len(table)
    print(f"\npredicted {n} items with {run['model'].name} -> {out_path}")
    if fitted:
        print(f"  probabilities calibrated with temperature {temperature:.4g} from {run['path'] / 'temperature.json'}")
    else:
        print(f"  probabilities NOT calibrated (T=1): run `prodfuse evaluate --run {run['path']}` to fit a "
              f"temperature")
    if args.catalog:
        print(f"  rejected (not embeddable): {n_rejected}; see {rejects_out}")
    elif n_rejected:
        print(f"  the shard folder lists {n_rejected} rejected catalog rows ({folder / shards.REJECTS})")
    if with_label and n:
        known = np.isin(data[label_col].astype(str), run["classes"])
        if known.any():
            acc = float(np.mean(table["label_1"].to_numpy()[known] == data[label_col].astype(str)[known]))
            print(f"  top-1 accuracy on the {int(known.sum())} items with a known label: {acc:.4f}")
    kind = "mean gate (image share)" if res["gate"] is not None else "drop of the top probability when zeroed"
    print(f"  modality contributions: {kind}")
    return {"predictions": str(out_path), "n": n, "rejected": n_rejected, "temperature": temperature,
            "calibrated": fitted, "embeddings": str(folder),
            "rejects": str(rejects_out) if args.catalog else None}
