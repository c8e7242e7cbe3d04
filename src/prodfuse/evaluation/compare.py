"""Unimodal baselines, linear probes and the fusion models, all trained and scored on the same splits.

Each model is one `train` run in its own sub-folder. Late fusion trains nothing new: it mixes the calibrated
probabilities of the image-only and text-only runs, w * p_image + (1 - w) * p_text, with w chosen on validation.
The linear probes (`probes.py`) are logistic regressions on the same shard features. With `--folds K` or
`--seeds N` everything is repeated per fold or seed and reported as mean ± std.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from prodfuse.data import shards
from prodfuse.evaluation.config import METRICS_ORDER, TRAINED, CompareConfig
from prodfuse.evaluation.probes import PROBES
from prodfuse.inference.calibration import apply_temperature, fit_late_weight
from prodfuse.modeling.config import FUSIONS, TrainConfig
from prodfuse.modeling.metrics import classification_metrics

log = logging.getLogger(__name__)
METRICS = METRICS_ORDER


def text_branch_for(folder: str | Path, requested: str = "auto") -> str:
    """mlp when the shards hold a text embedding (text encoder other than none), else the token CNN."""
    if requested != "auto":
        return requested
    return "mlp" if "text_embedding" in shards.shard_columns(folder) else "cnn"


def train_config(config: CompareConfig, model: str, out: Path, text_branch: str, seed: int, fold: int) -> TrainConfig:
    """The TrainConfig of one compared model: train's defaults, the shared settings of `config`."""
    shared = TrainConfig(
        embeddings=str(config.embeddings),
        val_embeddings=config.val_embeddings,
        test_embeddings=config.test_embeddings,
        folds=config.folds,
        fold=fold if config.folds else 0,
        label_col=config.label_col,
        split_col=config.split_col,
        epochs=config.epochs,
        patience=config.patience,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        monitor=config.monitor,
        seed=seed,
        out=str(out),
        overwrite=config.overwrite,
        verbose=2,
    )
    if model == "image":
        return dataclasses.replace(shared, text_branch="none")
    if model == "text":
        return dataclasses.replace(shared, image_branch="none", text_branch=text_branch)
    if model in FUSIONS:
        return dataclasses.replace(shared, fusion=model, text_branch=text_branch)
    if model == "product_no_probe":
        return dataclasses.replace(shared, fusion="product", probe_expert=False, text_branch=text_branch)
    raise ValueError(
        f"{model!r} is not a trained model; choose one of image, text, {', '.join(FUSIONS)}, product_no_probe"
    )


def late_fusion(image_run: Path, text_run: Path, eval_split: str, objective: str = "logloss") -> dict:
    """Calibrate both unimodal runs on validation, fit w on validation, score the mix on `eval_split`."""
    from prodfuse.evaluation.evaluate import calibrate_run, split_probs
    from prodfuse.modeling.run import Run

    temps, val, ev, classes = {}, {}, {}, {}
    for name, run_dir in (("image", image_run), ("text", text_run)):
        run = Run.load(run_dir)
        val[name] = split_probs(run, "val")
        temps[name], _ = calibrate_run(run, val=val[name])
        y, p = split_probs(run, eval_split)
        ev[name] = (y, apply_temperature(p, temps[name]))
        val[name] = (val[name][0], apply_temperature(val[name][1], temps[name]))
        classes[name] = run.classes
    if (
        classes["image"] != classes["text"]
        or not np.array_equal(val["image"][0], val["text"][0])
        or not np.array_equal(ev["image"][0], ev["text"][0])
    ):
        raise ValueError(
            f"the image run {image_run} and text run {text_run} have different classes or splits; "
            f"train both on the same --embeddings with the same seed/split."
        )
    w, grid = fit_late_weight(val["image"][0], val["image"][1], val["text"][1], objective)
    y = ev["image"][0]
    return {
        "weight": w,
        "objective": objective,
        "temperatures": temps,
        "grid": grid,
        "metrics": classification_metrics(y, w * ev["image"][1] + (1 - w) * ev["text"][1]),
    }


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _md(rows: list[dict], split: str) -> str:
    lines = [f"| model | accuracy | weighted F1 | macro F1 | train s | n ({split}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [_fmt(r[m], r.get(f"{m}_std")) for m in METRICS]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['train_seconds']:.1f} | {r['n']} |")
    return "\n".join(lines)


def repetitions(config: CompareConfig) -> list[dict]:
    """One dict per repetition: its seed, fold (None without folds) and sub-folder name."""
    if config.folds:
        return [{"seed": config.seed, "fold": k, "name": f"fold{k}"} for k in range(config.folds)]
    if config.seeds == 1:
        return [{"seed": config.seed, "fold": None, "name": ""}]
    return [{"seed": config.seed + i, "fold": None, "name": f"seed{config.seed + i}"} for i in range(config.seeds)]


def _probe_rows(
    config: CompareConfig,
    label_col: str,
    rep: dict,
    probes: list[str],
    classes: list[str],
    eval_split: str,
    cache: dict,
) -> dict:
    """The linear probes on the splits of this repetition (recomputed exactly as `train` makes them). The probes
    are deterministic, so repetitions with the same splits (seeds over a split column) reuse `cache`."""
    from prodfuse.evaluation.probes import run_probes
    from prodfuse.modeling.training import load_split_data

    inputs = ["image", "text"] + (["image_views"] if "image_views" in shards.shard_columns(config.embeddings) else [])
    data = load_split_data(
        Path(config.embeddings),
        label_col,
        config.split_col,
        rep["seed"],
        inputs,
        val_embeddings=config.val_embeddings,
        test_embeddings=config.test_embeddings,
        folds=config.folds,
        fold=rep["fold"] or 0,
    )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(c, -1) for c in data["labels"]], dtype=np.int64)
    splits = {k: v[y[v] >= 0] for k, v in data["splits"].items()}  # as train: unseen labels are not scored
    key = hash(tuple(splits[k].tobytes() for k in ("train", "val", eval_split)))
    if key not in cache:
        cache[key] = run_probes(
            data["arrays"], y, splits, len(classes), eval_split, probes, cache_dir=config.probe_cache
        )
    return cache[key]


def compare_once(
    config: CompareConfig, rep: dict, models: list[str], out: Path, text_branch: str, probe_cache: dict
) -> dict:
    """Every model of one repetition: {"rows": [...], "splits": ..., "eval_split": ..., "late_fusion": ...}."""
    import keras

    from prodfuse.modeling.training import train

    trained = [m for m in TRAINED if m in models and m != "late"]
    if "late" in models:  # late fusion needs both unimodal runs, listed or not
        trained = list(dict.fromkeys(["image", "text"] + trained))
    if not trained:  # probes alone still need the classes and splits that training would use
        trained = ["image"]
    results = {}
    for i, m in enumerate(trained):
        log.info("[%s %d/%d] training %s -> %s", rep["name"] or "run", i + 1, len(trained), m, out / m)
        keras.backend.clear_session()  # each run starts from a clean graph and the same seed
        results[m] = train(train_config(config, m, out / m, text_branch, rep["seed"], rep["fold"] or 0))
    any_run = results[trained[0]]
    splits = any_run.config["splits"]
    eval_split = "test" if splits["test"] else "val"
    probes = [m for m in models if m in PROBES]
    probe_results = {}
    if probes:
        log.info("[%s] linear probes %s", rep["name"] or "run", ", ".join(probes))
        probe_results = _probe_rows(config, any_run.label_col, rep, probes, any_run.classes, eval_split, probe_cache)
    rows, late = [], None
    for m in models:
        if m == "late":
            t0 = time.perf_counter()
            late = late_fusion(out / "image", out / "text", eval_split, config.late_objective)
            metrics = late["metrics"]
            seconds = (
                results["image"].config["train_seconds"]
                + results["text"].config["train_seconds"]
                + time.perf_counter()
                - t0
            )
            run = f"{out / 'image'} + {out / 'text'}"
        elif m in PROBES:
            metrics, seconds, run = probe_results[m]["metrics"], probe_results[m]["seconds"], "(scikit-learn)"
        else:
            metrics, seconds, run = (
                results[m].metrics[eval_split],
                results[m].config["train_seconds"],
                str(results[m].path),
            )
        rows.append(
            {
                "model": m,
                **{k: metrics[k] for k in METRICS},
                "top3_accuracy": metrics.get("top3_accuracy"),
                "n": metrics["n"],
                "train_seconds": round(float(seconds), 1),
                "run": str(run),
            }
        )
    return {
        "rows": rows,
        "splits": splits,
        "eval_split": eval_split,
        "late_fusion": late and {k: v for k, v in late.items() if k != "metrics"},
        "probe_late_fusion": probe_results.get("lr_late", {}).get("late_fusion"),
    }


def aggregate(per_rep: list[list[dict]]) -> list[dict]:
    """Mean (and std over repetitions, when there are several) of every metric, per model, in model order."""
    out = []
    for i, first in enumerate(per_rep[0]):
        rows = [rep[i] for rep in per_rep]
        row = {
            "model": first["model"],
            "run": first["run"],
            "repetitions": len(rows),
            "n": int(np.mean([r["n"] for r in rows])),
            "train_seconds": float(np.mean([r["train_seconds"] for r in rows])),
        }
        for m in METRICS + ("top3_accuracy",):
            values = [r[m] for r in rows if r.get(m) is not None]
            if values:
                row[m] = float(np.mean(values))
                if len(rows) > 1:
                    row[f"{m}_std"] = float(np.std(values, ddof=1))
                    row[f"{m}_all"] = [float(v) for v in values]
        out.append(row)
    return out


def compare(config: CompareConfig) -> dict:
    """Train and score every model of `config.models` on the same splits; writes compare.md and compare.json
    under the output folder and returns what compare.json holds (its "markdown" is the table)."""
    models = list(config.models)
    reps = repetitions(config)
    emb = Path(config.embeddings)
    shards.read_manifest(emb)  # a clear error before any training when the folder is wrong
    out = Path(config.out or Path("runs") / f"compare-{emb.name}")
    out.mkdir(parents=True, exist_ok=True)
    text_branch = text_branch_for(emb, config.text_branch)
    notes = []
    if text_branch != "mlp" and any(m in PROBES and m != "lr_image" for m in models):
        dropped = [m for m in models if m in PROBES and m != "lr_image"]
        notes.append(f"{emb} holds no text embedding, so the text probes {dropped} are left out.")
        models = [m for m in models if m not in dropped]
    cache: dict = {}
    done = [
        compare_once(config, rep, models, out / rep["name"] if rep["name"] else out, text_branch, cache) for rep in reps
    ]
    rows = aggregate([d["rows"] for d in done])
    first = done[0]
    eval_split, s = first["eval_split"], first["splits"]
    how = (
        (f"{len(reps)} folds" if config.folds else f"{len(reps)} seeds ({reps[0]['seed']}..{reps[-1]['seed']})")
        if len(reps) > 1
        else f"seed {config.seed}"
    )
    late = first["late_fusion"]
    note = (
        (
            f"Late fusion: w = {late['weight']:.2f} (image share), chosen on validation by {late['objective']}; "
            f"temperatures image {late['temperatures']['image']:.3g}, text {late['temperatures']['text']:.3g}; "
            f"its train time is both unimodal runs'."
            + (
                " There is no test split, so w and the temperatures were chosen on the very rows scored here."
                if eval_split == "val"
                else ""
            )
        )
        if late
        else ""
    )
    if any(m in PROBES for m in models):
        note += (
            " lr_*: scikit-learn LogisticRegression(C=10) on the L2-normalised image embedding, the text "
            "embedding, both concatenated, and the calibrated late fusion of the first two, fitted on the "
            "same training rows."
        )
    if len(reps) > 1:
        note += f" Mean ± std over {how}."
    scored = s["test" if eval_split == "test" else "val"]
    if scored < 100:
        note += f" Only {scored} items are scored: differences of a few points are noise."
    table = _md(rows, eval_split)
    md = [
        f"# Model comparison on `{emb}`",
        "",
        f"Scored on the {eval_split} split ({s['source']}: {s['train']} train / {s['val']} val / {s['test']} test), "
        f"at most {config.epochs} epochs, {how}, text branch {text_branch}.",
        "",
        table,
        "",
    ]
    if note:
        md += [note.strip(), ""]
    (out / "compare.md").write_text("\n".join(md))
    summary = {
        "embeddings": str(emb.resolve()),
        "split": eval_split,
        "splits": s,
        "repeated_over": how,
        "text_branch": text_branch,
        "epochs": config.epochs,
        "seed": config.seed,
        "rows": rows,
        "per_repetition": [
            {
                "name": r["name"],
                "seed": r["seed"],
                "fold": r["fold"],
                "rows": d["rows"],
                "late_fusion": d["late_fusion"],
                "probe_late_fusion": d["probe_late_fusion"],
            }
            for r, d in zip(reps, done)
        ],
        "late_fusion": first["late_fusion"],
        "notes": notes,
        "note": note.strip(),
        "markdown": table,
        "out": str(out),
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    return summary
