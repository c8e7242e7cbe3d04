"""Unimodal baselines, linear probes and the fusion models, all trained and scored on the same splits.

Each model is one `train` run in its own sub-folder. Late fusion trains nothing new: it mixes the calibrated
probabilities of the image-only and text-only runs, w * p_image + (1 - w) * p_text, with w chosen on validation.
The linear probes (`probes.py`) are logistic regressions on the same shard features. With `--folds K` or
`--seeds N` everything is repeated per fold or seed and reported as mean ± std.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import shards
from .calibration import apply_temperature, fit_late_weight
from .metrics import classification_metrics
from .probes import PROBES

TRAINED = ("image", "text", "late", "concat", "gated", "cross_attention")
MODELS = TRAINED + PROBES
FUSIONS = ("concat", "gated", "cross_attention")
METRICS = ("accuracy", "weighted_f1", "macro_f1")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="shard folder (as for train)")
    p.add_argument("--val-embeddings", default=None, help="separate shard folder used as the validation split")
    p.add_argument("--test-embeddings", default=None,
                   help="separate shard folder scored as the test split (never used for early stopping)")
    p.add_argument("--folds", type=int, default=None,
                   help="stratified K-fold cross-validation: fold k test, fold k+1 val, K runs (mean ± std)")
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat with N seeds (model init and, without a split column, the split); mean ± std")
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
    for flag, value in (("--val-embeddings", args.val_embeddings),
                        ("--test-embeddings", getattr(args, "test_embeddings", None)),
                        ("--folds", getattr(args, "folds", None))):
        if value:
            argv += [flag, str(value)]
    if getattr(args, "folds", None):
        argv += ["--fold", str(getattr(args, "fold", 0))]
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


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _md(rows: list[dict], split: str) -> str:
    lines = [f"| model | accuracy | weighted F1 | macro F1 | train s | n ({split}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [_fmt(r[m], r.get(f"{m}_std")) for m in METRICS]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['train_seconds']:.1f} | {r['n']} |")
    return "\n".join(lines)


def repetitions(args: argparse.Namespace) -> list[dict]:
    """One dict per repetition: its seed, fold (None without --folds) and sub-folder name."""
    folds, seeds = getattr(args, "folds", None), getattr(args, "seeds", 1) or 1
    if folds and seeds > 1:
        raise ValueError(f"--folds {folds} and --seeds {seeds}: choose one way to repeat (folds vary the data, "
                         f"seeds the split and the model's initialisation).")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}")
    if folds:
        return [{"seed": args.seed, "fold": k, "name": f"fold{k}"} for k in range(folds)]
    if seeds == 1:
        return [{"seed": args.seed, "fold": None, "name": ""}]
    return [{"seed": args.seed + i, "fold": None, "name": f"seed{args.seed + i}"} for i in range(seeds)]


def _probe_rows(args, rep: dict, probes: list[str], classes: list[str], eval_split: str, cache: dict) -> dict:
    """The linear probes on the splits of this repetition (recomputed exactly as `train` makes them). The probes
    are deterministic, so repetitions with the same splits (seeds over a split column) reuse `cache`."""
    from .train import load_split_data
    from .predict import shard_columns
    inputs = ["image", "text"] + (["image_views"] if "image_views" in shard_columns(args.embeddings) else [])
    data = load_split_data(Path(args.embeddings), args.label_col, args.split_col, rep["seed"], inputs,
                           val_embeddings=args.val_embeddings, test_embeddings=getattr(args, "test_embeddings", None),
                           folds=getattr(args, "folds", None), fold=rep["fold"] or 0)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(c, -1) for c in data["labels"]], dtype=np.int64)
    splits = {k: v[y[v] >= 0] for k, v in data["splits"].items()}  # as train: unseen labels are not scored
    key = hash(tuple(splits[k].tobytes() for k in ("train", "val", eval_split)))
    if key not in cache:
        from .probes import run_probes
        cache[key] = run_probes(data["arrays"], y, splits, len(classes), eval_split, probes)
    return cache[key]


def compare_once(args: argparse.Namespace, rep: dict, models: list[str], out: Path, text_branch: str,
                 probe_cache: dict) -> dict:
    """Every model of one repetition: {"rows": [...], "splits": ..., "eval_split": ..., "late_fusion": ...}."""
    import keras

    from .train import run_train

    trained = [m for m in TRAINED if m in models and m != "late"]
    if "late" in models:  # late fusion needs both unimodal runs, listed or not
        trained = list(dict.fromkeys(["image", "text"] + trained))
    if not trained:  # probes alone still need the classes and splits that training would use
        trained = ["image"]
    r_args = argparse.Namespace(**{**vars(args), "seed": rep["seed"], "fold": rep["fold"] or 0})
    results = {}
    for i, m in enumerate(trained):
        print(f"[{rep['name'] or 'run'} {i + 1}/{len(trained)}] training {m} -> {out / m}", file=sys.stderr)
        keras.backend.clear_session()  # each run starts from a clean graph and the same seed
        results[m] = run_train(train_namespace(r_args, m, out / m, text_branch))
    any_run = results[trained[0]]
    eval_split = "test" if any_run["splits"]["test"] else "val"
    probes = [m for m in models if m in PROBES]
    probe_results = {}
    if probes:
        classes = json.loads((Path(any_run["run"]) / "labels.json").read_text())
        print(f"[{rep['name'] or 'run'}] linear probes {', '.join(probes)}", file=sys.stderr)
        probe_results = _probe_rows(args, rep, probes, classes, eval_split, probe_cache)
    rows, late = [], None
    for m in models:
        if m == "late":
            t0 = time.perf_counter()
            late = late_fusion(out / "image", out / "text", eval_split, args.late_objective)
            metrics = late["metrics"]
            seconds = results["image"]["train_seconds"] + results["text"]["train_seconds"] + \
                time.perf_counter() - t0
            run = f"{out / 'image'} + {out / 'text'}"
        elif m in PROBES:
            metrics, seconds, run = probe_results[m]["metrics"], probe_results[m]["seconds"], "(scikit-learn)"
        else:
            metrics, seconds, run = results[m]["metrics"][eval_split], results[m]["train_seconds"], results[m]["run"]
        rows.append({"model": m, **{k: metrics[k] for k in METRICS}, "top3_accuracy": metrics.get("top3_accuracy"),
                     "n": metrics["n"], "train_seconds": round(float(seconds), 1), "run": str(run)})
    return {"rows": rows, "splits": any_run["splits"], "eval_split": eval_split,
            "late_fusion": late and {k: v for k, v in late.items() if k != "metrics"},
            "probe_late_fusion": probe_results.get("lr_late", {}).get("late_fusion")}


def aggregate(per_rep: list[list[dict]]) -> list[dict]:
    """Mean (and std over repetitions, when there are several) of every metric, per model, in model order."""
    out = []
    for i, first in enumerate(per_rep[0]):
        rows = [rep[i] for rep in per_rep]
        row = {"model": first["model"], "run": first["run"], "repetitions": len(rows),
               "n": int(np.mean([r["n"] for r in rows])),
               "train_seconds": float(np.mean([r["train_seconds"] for r in rows]))}
        for m in METRICS + ("top3_accuracy",):
            values = [r[m] for r in rows if r.get(m) is not None]
            if values:
                row[m] = float(np.mean(values))
                if len(rows) > 1:
                    row[f"{m}_std"] = float(np.std(values, ddof=1))
                    row[f"{m}_all"] = [float(v) for v in values]
        out.append(row)
    return out


def run_compare(args: argparse.Namespace) -> dict:
    models = parse_models(args.models)
    reps = repetitions(args)
    emb = Path(args.embeddings)
    shards.read_manifest(emb)  # a clear error before any training when the folder is wrong
    out = Path(args.out or Path("runs") / f"compare-{emb.name}")
    out.mkdir(parents=True, exist_ok=True)
    text_branch = text_branch_for(emb, args.text_branch)
    if text_branch != "mlp" and any(m in PROBES and m != "lr_image" for m in models):
        dropped = [m for m in models if m in PROBES and m != "lr_image"]
        print(f"note: {emb} holds no text embedding, so the text probes {dropped} are left out.", file=sys.stderr)
        models = [m for m in models if m not in dropped]
    cache: dict = {}
    done = [compare_once(args, rep, models, out / rep["name"] if rep["name"] else out, text_branch, cache)
            for rep in reps]
    rows = aggregate([d["rows"] for d in done])
    first = done[0]
    eval_split, s = first["eval_split"], first["splits"]
    how = (f"{len(reps)} folds" if getattr(args, "folds", None) else f"{len(reps)} seeds ({reps[0]['seed']}.."
           f"{reps[-1]['seed']})") if len(reps) > 1 else f"seed {args.seed}"
    summary = {"embeddings": str(emb.resolve()), "split": eval_split, "splits": s, "repeated_over": how,
               "text_branch": text_branch, "epochs": args.epochs, "seed": args.seed, "rows": rows,
               "per_repetition": [{"name": r["name"], "seed": r["seed"], "fold": r["fold"], "rows": d["rows"],
                                   "late_fusion": d["late_fusion"], "probe_late_fusion": d["probe_late_fusion"]}
                                  for r, d in zip(reps, done)],
               "late_fusion": first["late_fusion"]}
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    late = first["late_fusion"]
    note = (f"Late fusion: w = {late['weight']:.2f} (image share), chosen on validation by {late['objective']}; "
            f"temperatures image {late['temperatures']['image']:.3g}, text {late['temperatures']['text']:.3g}; "
            f"its train time is both unimodal runs'."
            + (" There is no test split, so w and the temperatures were chosen on the very rows scored here."
               if eval_split == "val" else "")) if late else ""
    if any(m in PROBES for m in models):
        note += (" lr_*: scikit-learn LogisticRegression(C=10) on the L2-normalised image embedding, the text "
                 "embedding, both concatenated, and the calibrated late fusion of the first two, fitted on the "
                 "same training rows.")
    if len(reps) > 1:
        note += f" Mean ± std over {how}."
    small = s["test" if eval_split == "test" else "val"] < 100
    if small:
        note += (f" Only {s['test' if eval_split == 'test' else 'val']} items are scored: differences of a few "
                 f"points are noise.")
    md = [f"# Model comparison on `{emb}`", "",
          f"Scored on the {eval_split} split ({s['source']}: {s['train']} train / {s['val']} val / {s['test']} test), "
          f"at most {args.epochs} epochs, {how}, text branch {text_branch}.", "", _md(rows, eval_split), ""]
    if note:
        md += [note.strip(), ""]
    (out / "compare.md").write_text("\n".join(md))
    print(f"\ncompared {len(rows)} models on the {eval_split} split of {emb} ({how})")
    print(_md(rows, eval_split))
    if note:
        print(note.strip())
    print(f"  table: {out / 'compare.md'}, {out / 'compare.json'}")
    return summary
