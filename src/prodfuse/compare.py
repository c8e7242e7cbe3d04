"""Unimodal baselines against the fusion models, all trained and scored on the same splits.

Each model is one `train` run in its own sub-folder. Late fusion trains nothing new: it mixes the calibrated
probabilities of the image-only and text-only runs, w * p_image + (1 - w) * p_text, with w chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import shards
from .calibration import apply_temperature
from .metrics import classification_metrics

MODELS = ("image", "text", "late", "concat", "gated", "cross_attention")
FUSIONS = ("concat", "gated", "cross_attention")
LATE_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="shard folder (as for train)")
    p.add_argument("--val-embeddings", default=None, help="separate shard folder used as the validation split")
    p.add_argument("--label-col", default="label", help="label column carried in the shards (default label)")
    p.add_argument("--split-col", default=None,
                   help="train/val/test column in the shards (default: the one recorded at extraction)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--text-branch", default="auto", choices=["auto", "mlp", "cnn"],
                   help="text branch of the text and fusion models (auto: mlp when the shards hold text "
                        "embeddings, else the token CNN)")
    p.add_argument("--late-objective", default="logloss", choices=["logloss", "accuracy"],
                   help="what the late-fusion weight minimises/maximises on validation (default logloss)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list of models to compare (default {','.join(MODELS)})")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<embeddings name>)")


def parse_models(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        raise ValueError(f"--models {value!r}: unknown {bad or 'empty list'}; choose from {','.join(MODELS)}.")
    return list(dict.fromkeys(names))


def text_branch_for(folder: str | Path, requested: str = "auto") -> str:
    """mlp when the shards hold a text embedding (text encoder other than none), else the token CNN."""
    if requested != "auto":
        return requested
    from .predict import shard_columns
    return "mlp" if "text_embedding" in shard_columns(folder) else "cnn"


def train_namespace(args: argparse.Namespace, model: str, out: Path, text_branch: str) -> argparse.Namespace:
    """The `train` arguments of one compared model, parsed by train's own parser so every default is train's."""
    from .train import add_args as add_train_args
    p = argparse.ArgumentParser()
    add_train_args(p)
    argv = ["--embeddings", str(args.embeddings), "--label-col", args.label_col, "--epochs", str(args.epochs),
            "--patience", str(args.patience), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--out", str(out), "--quiet"]
    if args.val_embeddings:
        argv += ["--val-embeddings", str(args.val_embeddings)]
    if args.split_col is not None:
        argv += ["--split-col", args.split_col]
    if model == "image":
        argv += ["--text-branch", "none"]
    elif model == "text":
        argv += ["--image-branch", "none", "--text-branch", text_branch]
    elif model in FUSIONS:
        argv += ["--fusion", model, "--text-branch", text_branch]
    else:
        raise ValueError(f"{model!r} is not a trained model; choose one of image, text, {', '.join(FUSIONS)}")
    return p.parse_args(argv)


def fit_late_weight(y: np.ndarray, p_image: np.ndarray, p_text: np.ndarray, objective: str = "logloss",
                    grid=LATE_GRID) -> tuple[float, dict]:
    """The image weight w in `grid` that is best on (y, p) by log-loss (lowest) or accuracy (highest; then log-loss).

    Ties go to the weight nearest 0.5, so a flat objective gives an even mix rather than an arbitrary end.
    """
    from .calibration import negative_log_likelihood
    if objective not in ("logloss", "accuracy"):
        raise ValueError(f"late-fusion objective must be logloss or accuracy; got {objective!r}")
    scores = {}
    for w in grid:
        p = w * p_image + (1 - w) * p_text
        ll = negative_log_likelihood(y, p)
        acc = float(np.mean(p.argmax(axis=1) == y))
        scores[float(w)] = (ll, acc)
    if objective == "logloss":
        key = lambda w: (round(scores[w][0], 9), abs(w - 0.5))  # noqa: E731
    else:
        key = lambda w: (-scores[w][1], round(scores[w][0], 9), abs(w - 0.5))  # noqa: E731
    best = min(scores, key=key)
    return best, {f"{w:.2f}": {"logloss": s[0], "accuracy": s[1]} for w, s in scores.items()}


def late_fusion(image_run: Path, text_run: Path, eval_split: str, objective: str = "logloss") -> dict:
    """Calibrate both unimodal runs on validation, fit w on validation, score the mix on `eval_split`."""
    from .evaluate import calibrate_run, split_probs
    from .predict import load_run

    temps, val, ev, classes = {}, {}, {}, {}
    for name, run_dir in (("image", image_run), ("text", text_run)):
        run = load_run(run_dir)
        val[name] = split_probs(run, "val")
        temps[name], _ = calibrate_run(run, val=val[name])
        y, p = split_probs(run, eval_split)
        ev[name] = (y, apply_temperature(p, temps[name]))
        val[name] = (val[name][0], apply_temperature(val[name][1], temps[name]))
        classes[name] = run["classes"]
    if classes["image"] != classes["text"] or not np.array_equal(val["image"][0], val["text"][0]) or \
            not np.array_equal(ev["image"][0], ev["text"][0]):
        raise ValueError(f"the image run {image_run} and text run {text_run} have different classes or splits; "
                         f"train both on the same --embeddings with the same seed/split.")
    w, grid = fit_late_weight(val["image"][0], val["image"][1], val["text"][1], objective)
    y = ev["image"][0]
    return {"weight": w, "objective": objective, "temperatures": temps, "grid": grid,
            "metrics": classification_metrics(y, w * ev["image"][1] + (1 - w) * ev["text"][1])}


def _md(rows: list[dict], split: str) -> str:
    lines = [f"| model | accuracy | weighted F1 | macro F1 | train s | n ({split}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['accuracy']:.4f} | {r['weighted_f1']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['train_seconds']:.1f} | {r['n']} |")
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> dict:
    import keras

    from .train import run_train

    models = parse_models(args.models)
    emb = Path(args.embeddings)
    shards.read_manifest(emb)  # a clear error before any training when the folder is wrong
    out = Path(args.out or Path("runs") / f"compare-{emb.name}")
    out.mkdir(parents=True, exist_ok=True)
    text_branch = text_branch_for(emb, args.text_branch)
    to_train = [m for m in MODELS if m in models and m != "late"]
    if "late" in models:  # late fusion needs both unimodal runs, listed or not
        to_train = list(dict.fromkeys(["image", "text"] + to_train))
    results = {}
    for i, m in enumerate(to_train):
        print(f"[{i + 1}/{len(to_train)}] training {m} -> {out / m}", file=sys.stderr)
        keras.backend.clear_session()  # each run starts from a clean graph and the same seed
        results[m] = run_train(train_namespace(args, m, out / m, text_branch))
    any_run = results[to_train[0]]
    eval_split = "test" if any_run["splits"]["test"] else "val"
    rows, late = [], None
    for m in models:
        if m == "late":
            t0 = time.perf_counter()
            late = late_fusion(out / "image", out / "text", eval_split, args.late_objective)
            metrics = late["metrics"]
            seconds = results["image"]["train_seconds"] + results["text"]["train_seconds"] + \
                time.perf_counter() - t0
            run = f"{out / 'image'} + {out / 'text'}"
        else:
            metrics, seconds, run = results[m]["metrics"][eval_split], results[m]["train_seconds"], results[m]["run"]
        rows.append({"model": m, "accuracy": metrics["accuracy"], "top3_accuracy": metrics.get("top3_accuracy"),
                     "weighted_f1": metrics["weighted_f1"], "macro_f1": metrics["macro_f1"], "n": metrics["n"],
                     "train_seconds": round(float(seconds), 1), "run": str(run)})
    summary = {"embeddings": str(emb.resolve()), "split": eval_split, "splits": any_run["splits"],
               "text_branch": text_branch, "epochs": args.epochs, "seed": args.seed, "rows": rows,
               "late_fusion": late and {k: v for k, v in late.items() if k != "metrics"}}
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    note = (f"Late fusion: w = {late['weight']:.2f} (image share), chosen on validation by {late['objective']}; "
            f"temperatures image {late['temperatures']['image']:.3g}, text {late['temperatures']['text']:.3g}; "
            f"its train time is both unimodal runs'."
            + (" There is no test split, so w and the temperatures were chosen on the very rows scored here."
               if eval_split == "val" else "")) if late else ""
    s = any_run["splits"]
    md = [f"# Model comparison on `{emb}`", "",
          f"Scored on the {eval_split} split ({s['source']}: {s['train']} train / {s['val']} val / {s['test']} test), "
          f"at most {args.epochs} epochs, seed {args.seed}, text branch {text_branch}.", "", _md(rows, eval_split), ""]
    if note:
        md += [note, ""]
    (out / "compare.md").write_text("\n".join(md))
    print(f"\ncompared {len(rows)} models on the {eval_split} split of {emb}")
    print(_md(rows, eval_split))
    if note:
        print(note)
    print(f"  table: {out / 'compare.md'}, {out / 'compare.json'}")
    return summary
