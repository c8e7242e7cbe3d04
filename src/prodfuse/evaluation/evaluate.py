"""Evaluation of a run: metrics, per-class and per-group reports, confusions, modality ablation and calibration.

Default rows are the run's held-out rows: on the run's own training shards the split is recomputed exactly as
training made it (same seed / split column); any other shard folder is scored whole.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from prodfuse.data import shards
from prodfuse.data.catalog import file_sha256
from prodfuse.data.sequence import read_items
from prodfuse.data.shards import shard_columns
from prodfuse.evaluation.config import EvaluateConfig
from prodfuse.inference.calibration import apply_temperature, fit_temperature, negative_log_likelihood, reliability_bins
from prodfuse.inference.forward import contributions, forward
from prodfuse.inference.predict import check_compatible, prediction_table
from prodfuse.modeling.metrics import classification_metrics, expected_calibration_error
from prodfuse.modeling.model_card import jsonable, record_evaluation, write_model_card
from prodfuse.modeling.probabilities import predict_arrays
from prodfuse.modeling.run import Run, save_temperature, train_config_of

log = logging.getLogger(__name__)
# Fewer validation items than this and a fitted temperature is noise (5 items gave T = 0.05 and worse ECE): T = 1.
MIN_CALIBRATION_ITEMS = 30
# Fewer scored items than this and a few points of accuracy are within the noise: reports say so.
FEW_ITEMS = 100


# ---------------------------------------------------------------------------------------------------- rows


def run_splits(config: dict) -> dict[str, tuple[Path, np.ndarray]]:
    """The run's train/val/test rows as (shard folder, row positions), recomputed exactly as `train` made them.

    Rows whose label training never saw are kept here (train drops them from val/test); callers report them. Rows
    with an empty label are in no split, as in training (runs trained before that: their splits were over every row).
    """
    from prodfuse.data.splits import plan_labelled_splits
    from prodfuse.modeling.training import resolve_split_col

    emb = Path(config["embeddings"])
    tc = train_config_of(config)
    a = {"folds": tc.folds, "fold": tc.fold, "split_col": tc.split_col, "seed": tc.seed} if tc else config["args"]
    manifest = shards.read_manifest(emb)
    if config.get("manifest_sha256") and file_sha256(emb / shards.MANIFEST) != config["manifest_sha256"]:
        log.warning(
            "%s changed since the run was trained (manifest differs); the recomputed split may not be the "
            "one training used.",
            emb,
        )
    folders = {"main": emb}
    for where, key in (("val", "val_embeddings"), ("test", "test_embeddings")):
        if config.get(key):
            folders[where] = Path(config[key])
    label_col = config["label_col"]
    split_col = resolve_split_col(manifest, a.get("split_col")) if "val" not in folders else None
    cols = shards.read_shards(emb, [label_col] + ([split_col] if split_col else []))
    labels = {"main": np.asarray(cols[label_col]).astype(str)}
    for where in ("val", "test"):
        if where in folders:
            labels[where] = np.asarray(shards.read_shards(folders[where], [label_col])[label_col]).astype(str)
    plan = plan_labelled_splits(
        labels,
        np.asarray(cols[split_col]) if split_col else None,
        split_col,
        a["seed"],
        label_col=label_col,
        folders=folders,
        folds=a.get("folds"),
        fold=a.get("fold") or 0,
        skip_empty="unlabelled_rows" in config.get("splits", {}),
    )[0]
    return {k: (folders[where], rows) for k, (where, rows) in plan.items()}


def _same_folder(a, b) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def select_rows(config: dict, folder: Path, split: str | None) -> tuple[np.ndarray | None, str, str]:
    """(rows or None for all, split name, note) of `folder` to evaluate."""
    if _same_folder(folder, config["embeddings"]):
        if split == "all":
            return None, "all", "every row of the run's training shards, training rows included"
        splits = run_splits(config)
        if config.get("val_embeddings"):
            raise ValueError(
                f"Every row of {str(folder)!r} was a training row (the run used --val-embeddings "
                f"{config['val_embeddings']}). Evaluate --embeddings {config['val_embeddings']}, "
                f"another held-out folder, or pass --split all."
            )
        name = split or ("test" if len(splits["test"][1]) and _same_folder(splits["test"][0], folder) else "val")
        if not _same_folder(splits[name][0], folder):
            raise ValueError(
                f"The run's {name} split is the separate folder {str(splits[name][0])!r}; evaluate "
                f"--embeddings {splits[name][0]} instead."
            )
        if len(splits[name][1]) == 0:
            raise ValueError(f"The run's {name} split is empty; pass --split val or --split all.")
        return splits[name][1], name, f"the run's {name} split ({config['splits']['source']})"
    if split in (None, "all"):
        return None, "all", "every row of a separate shard folder"
    manifest = shards.read_manifest(folder)
    col = manifest["columns"].get("split")
    if not col:
        raise ValueError(
            f"--split {split} needs a split column in {str(folder)!r}, which has none; omit --split "
            f"to score all its rows."
        )
    from prodfuse.data.splits import split_from_column

    rows = split_from_column(np.asarray(shards.read_shards(folder, [col])[col]))[split]
    return rows, split, f"rows of {str(folder)!r} whose {col!r} is {split}"


# ---------------------------------------------------------------------------------------------------- metrics


def per_class_report(y_true: np.ndarray, pred: np.ndarray, classes: list[str]):
    """DataFrame: class, precision, recall, f1, support, predicted (how often the class was predicted)."""
    import pandas as pd
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    return pd.DataFrame(
        {
            "class": classes,
            "precision": p,
            "recall": r,
            "f1": f,
            "support": s.astype(int),
            "predicted": np.bincount(np.asarray(pred, dtype=np.int64), minlength=len(classes)),
        }
    )


def confusion(y_true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, pred, labels=np.arange(k))


def _accuracy_f1(y: np.ndarray, probs: np.ndarray | None) -> dict | None:
    if probs is None:
        return None
    m = classification_metrics(y, probs, top_k=())
    return {k: m[k] for k in ("accuracy", "weighted_f1", "macro_f1")}


def modality_ablation(
    model, arrays: dict[str, np.ndarray], y_true: np.ndarray, batch_size: int = 1024, out: dict | None = None
) -> dict:
    """Accuracy / F1 with both streams, the image stream zeroed and the text stream zeroed (None: stream absent)."""
    out = out or forward(model, arrays, 1.0, batch_size)
    return {
        "both": _accuracy_f1(y_true, out["probs"]),
        "no_image": _accuracy_f1(y_true, out["no_image"]),
        "no_text": _accuracy_f1(y_true, out["no_text"]),
    }


def gate_per_class(gate: np.ndarray, y_true: np.ndarray, classes: list[str]):
    """DataFrame: class, n, mean gate (image share) and text share = 1 - gate, over items of that true class."""
    import pandas as pd

    k = len(classes)
    n = np.bincount(y_true, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(y_true, weights=gate, minlength=k) / n
    return pd.DataFrame(
        {"class": classes, "n": n, "image_gate": np.round(mean, 6), "text_share": np.round(1 - mean, 6)}
    )


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "group"


def _md_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- command


def split_probs(run: Run, name: str, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(y, softmax probabilities) of a loaded run on one of its own splits, over rows whose label the run knows."""
    config, classes = run.config, run.classes
    folder, rows = run_splits(config)[name]
    label_col = config["label_col"]
    data = read_items(folder, run.inputs, [label_col], rows)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(str(v), -1) for v in data[label_col]], dtype=np.int64)
    keep = (y >= 0) & ~shards.empty_cells(data[label_col])
    probs = predict_arrays(run.model, {k: data[k][keep] for k in run.inputs}, batch_size)
    return y[keep], probs


def calibrate_run(run: Run, batch_size: int = 1024, val: tuple | None = None) -> tuple[float, dict]:
    """Fit the temperature on the run's validation split and save it in the run folder; returns (T, details).

    T stays 1 (and `info["kept_t1"]` says why) when the split has fewer than MIN_CALIBRATION_ITEMS items or when
    the fitted T would raise the validation ECE. `val`: the (y, probs) of `split_probs(run, "val")` when the
    caller already has them.
    """
    y, probs = val if val is not None else split_probs(run, "val", batch_size)
    info = {
        "fitted_on": "val",
        "n": int(len(y)),
        "nll_before": negative_log_likelihood(y, probs),
        "ece_before": expected_calibration_error(y, probs),
    }
    t, why = 1.0, None
    if len(y) < MIN_CALIBRATION_ITEMS:
        why = f"the validation split has {len(y)} items, fewer than {MIN_CALIBRATION_ITEMS}: a fitted T is noise"
    else:
        fitted = fit_temperature(y, probs)
        ece = expected_calibration_error(y, apply_temperature(probs, fitted))
        if ece > info["ece_before"]:
            why = f"the fitted T = {fitted:.3g} raised the validation ECE ({info['ece_before']:.4f} -> {ece:.4f})"
        else:
            t = fitted
    cal = apply_temperature(probs, t)
    info.update(
        {"nll_after": negative_log_likelihood(y, cal), "ece_after": expected_calibration_error(y, cal), "kept_t1": why}
    )
    save_temperature(run.path, t, info)
    run.temperature, run.calibrated = t, True
    return t, info


def evaluate(cfg: EvaluateConfig) -> dict:
    """Score a run (see EvaluateConfig) and write the report folder; returns the metrics that metrics.json holds."""
    from prodfuse.evaluation import plots

    run = Run.load(cfg.run)
    run_config, classes, model = run.config, run.classes, run.model
    k = len(classes)
    folder = Path(cfg.embeddings or run_config["embeddings"])
    manifest = shards.read_manifest(folder)
    if not _same_folder(folder, run_config["embeddings"]):
        check_compatible(run_config, manifest, folder)
    rows, split, note = select_rows(run_config, folder, cfg.split)
    label_col = run_config["label_col"]
    id_col = manifest["columns"]["id"]
    present = shard_columns(folder)
    if present and label_col not in present:
        raise ValueError(
            f"Shards {str(folder)!r} have no label column {label_col!r} (the run's); evaluation "
            f"needs labels. Use `prodfuse predict` for unlabelled data."
        )
    levels = list(run.hierarchy.levels[:-1]) if run.hierarchy is not None else []
    missing = [c for c in levels if present and c not in present]
    if missing:
        raise ValueError(
            f"Shards {str(folder)!r} have no {missing} column(s), the coarser levels of the run's category hierarchy "
            f"{list(run.hierarchy.levels)}: the per-level figures need each row's true labels. Evaluate shards "
            f"extracted from a catalog with those columns (extraction keeps every catalog column)."
        )
    if cfg.group_col and present and cfg.group_col not in present:
        raise ValueError(
            f"--group-col {cfg.group_col!r} is not a column of {str(folder)!r}; it has "
            f"{[c for c in present if c not in ('image_embedding', 'text_embedding', 'tokens')]}."
        )
    out_dir = Path(cfg.out or run.path / f"eval-{split}")
    out_dir.mkdir(parents=True, exist_ok=True)

    temperature, cal_info = calibrate_run(run, cfg.batch_size)

    extra = [id_col, label_col] + levels + ([cfg.group_col] if cfg.group_col else [])
    data = read_items(folder, run.inputs, extra, rows)
    labels = shards.label_strings(data[label_col]).astype(str)
    unlabelled = labels == ""  # not a class, not scored (a run trained before may know "nan")
    index = {c: i for i, c in enumerate(classes)}
    y_all = np.array([index.get(c, -1) for c in labels], dtype=np.int64)
    known = (y_all >= 0) & ~unlabelled
    unknown = dict(Counter(labels[~known & ~unlabelled].tolist()))
    if unlabelled.all():
        raise ValueError(
            f"Every one of the {len(labels)} rows selected ({note}) has an empty {label_col!r} label (None, NaN or "
            f"blank): there is nothing to score. Fill {label_col!r} in the catalog and extract again, or use "
            f"`prodfuse predict` for unlabelled data."
        )
    if not known.any():
        raise ValueError(
            f"None of the {len(labels)} rows selected ({note}) has a label the run knows "
            f"({classes[:5]}...); check --embeddings and the run's label column {label_col!r}."
        )
    arrays = {k_: data[k_] for k_ in run.inputs}
    res = forward(model, arrays, temperature, cfg.batch_size)

    # Predictions of every selected row (unknown labels too), in the same format as `prodfuse predict`.
    img_c, txt_c = contributions(res)
    prediction_table(
        data[id_col],
        res["probs"],
        classes,
        min(5, k),
        img_c,
        txt_c,
        id_col=id_col,
        true_labels=labels,
        label_col=label_col,
        hierarchy=run.hierarchy,
    ).to_csv(out_dir / "predictions.csv", index=False)

    y = y_all[known]
    raw, probs = res["raw"][known], res["probs"][known]
    pred = probs.argmax(axis=1)
    metrics = classification_metrics(y, probs)
    ece, ece_cal = expected_calibration_error(y, raw), expected_calibration_error(y, probs)
    metrics.update(
        {
            "ece": ece,
            "ece_calibrated": ece_cal,
            "temperature": temperature,
            "nll": negative_log_likelihood(y, raw),
            "nll_calibrated": negative_log_likelihood(y, probs),
        }
    )
    if run.hierarchy is not None:  # per level, consistency and back-off, on the calibrated probabilities
        from prodfuse.modeling.hierarchy import hierarchy_metrics

        truth = {c: np.asarray(data[c])[known] for c in levels}
        metrics.update(hierarchy_metrics(run.hierarchy, probs, classes, y, truth))

    per_class = per_class_report(y, pred, classes)
    per_class.round(6).to_csv(out_dir / "per_class.csv", index=False)
    cm = confusion(y, pred, k)
    plots.plot_confusion(cm, classes, out_dir / "confusion.png")
    top = plots.top_confusions(cm, classes, cfg.top_confusions)
    _write_csv(out_dir / "confusions.csv", top, ["true", "pred", "count", "share_of_true"])
    plots.plot_reliability(
        reliability_bins(y, raw), reliability_bins(y, probs), ece, ece_cal, temperature, out_dir / "reliability.png"
    )

    sub = {key: (None if v is None else v[known]) for key, v in res.items() if key in ("probs", "no_image", "no_text")}
    ablation = modality_ablation(model, {}, y, out=sub)
    gate_mean = None
    if res["gate"] is not None:
        gate = res["gate"][known]
        gate_mean = float(gate.mean())
        gate_per_class(gate, y, classes).to_csv(out_dir / "gate_per_class.csv", index=False)
    ablation["gate_mean"] = gate_mean

    per_group = {}
    if cfg.group_col:
        groups = np.asarray(data[cfg.group_col]).astype(str)[known]
        for g in sorted(set(groups.tolist())):
            m = groups == g
            gm = classification_metrics(y[m], probs[m])
            present_cls = np.union1d(y[m], pred[m])
            gcm = confusion(y[m], pred[m], k)[np.ix_(present_cls, present_cls)]
            gnames = [classes[i] for i in present_cls]
            slug = _slug(g)
            title = f"{cfg.group_col} = {g}: row-normalised ({len(gnames)} classes, n={int(m.sum())})"
            plots.plot_confusion(gcm, gnames, out_dir / f"confusion_{slug}.png", title=title)
            gtop = plots.top_confusions(gcm, gnames, cfg.top_confusions)
            _write_csv(out_dir / f"confusions_{slug}.csv", gtop, ["true", "pred", "count", "share_of_true"])
            per_group[g] = {
                **gm,
                "ece": expected_calibration_error(y[m], probs[m]),
                "figure": f"confusion_{slug}.png",
                "top_confusions": gtop[:5],
            }

    without_duplicates = None
    if cfg.exclude_duplicates_of:
        dup = _has_duplicate_in(cfg, run_config, folder, rows, data.get("image"))[known]
        kept = ~dup
        without_duplicates = {
            "against": cfg.exclude_duplicates_of,
            "threshold": cfg.duplicate_threshold,
            "duplicates": int(dup.sum()),
            **(classification_metrics(y[kept], probs[kept]) if kept.any() else {"n": 0}),
        }

    result = {
        **metrics,
        "without_duplicates": without_duplicates,
        "split": split,
        "rows": note,
        "unknown_label_rows": int((~known & ~unlabelled).sum()),
        "unlabelled_rows": int(unlabelled.sum()),
        "unknown_labels": unknown,
        "per_group": per_group,
        "group_col": cfg.group_col,
        "ablation": ablation,
        "calibration": {
            "temperature": temperature,
            "fitted_on": "the run's validation split",
            "in_sample": split == "val" and _same_folder(folder, run_config["embeddings"]),
            **{f"val_{k_}": v for k_, v in cal_info.items() if k_ != "fitted_on"},
        },
        "top_confusions": top,
        "run": str(run.path),
        "embeddings": str(folder),
        "model": model.name,
        "model_sha256": run.fingerprint,
        "out": str(out_dir),
        "note": (
            f"Only {int(known.sum())} items are scored: differences of a few points are noise."
            if known.sum() < FEW_ITEMS
            else None
        ),
    }
    (out_dir / "metrics.json").write_text(json.dumps(jsonable(result), indent=1))
    (out_dir / "report.md").write_text(_report(result, classes))
    # the run's card shows this evaluation (replacing an earlier one of the same folder and split) and the
    # temperature calibrate_run just saved
    record_evaluation(run.path, jsonable(result))
    write_model_card(run.path)
    return result


def _has_duplicate_in(cfg: EvaluateConfig, run_config: dict, folder: Path, rows, scored=None) -> np.ndarray:
    """Per scored row: has it a near duplicate (image cosine >= threshold) among the reference items? The run's own
    training shards as reference mean its train rows; any other folder, all of its rows. `scored`: the scored rows'
    image embeddings when the caller has read them already."""
    from prodfuse.retrieval.duplicates import best_match

    ref = Path(cfg.exclude_duplicates_of)
    ref_rows = run_splits(run_config)["train"][1] if _same_folder(ref, run_config["embeddings"]) else None
    col = "image_embedding"
    for f in (folder, ref):
        if col not in shard_columns(f):
            raise ValueError(f"exclude_duplicates_of compares photos, and shards {str(f)!r} hold no {col}")
    a = scored if scored is not None else shards.read_shards(folder, [col], rows)[col]
    b = shards.read_shards(ref, [col], ref_rows)[col]
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"exclude_duplicates_of {str(ref)!r} holds {b.shape[1]}-d image embeddings, the scored shards "
            f"{a.shape[1]}-d: use shards made with the same backbone"
        )
    return best_match(a, b)[1] >= cfg.duplicate_threshold


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def _duplicates_lines(wd: dict) -> list[str]:
    return [
        f"Without the {wd['duplicates']} items that have a near-duplicate photo (image cosine >= {wd['threshold']}) "
        f"in `{wd['against']}`:",
        "",
        _md_table([wd], ["accuracy", "weighted_f1", "macro_f1", "n"]) if wd["n"] else "(no item left)",
        "",
    ]


def _hierarchy_lines(r: dict) -> list[str]:
    """The report's per-level section (a run trained with label_cols)."""
    return [
        "## Category levels",
        "",
        "Each level's prediction is the node of the most probable label's path; its probability is the sum of its "
        f"labels' (calibrated). Predicted paths that are paths of the tree: {r['consistent_paths']:.4f}.",
        "",
        _md_table([{"level": level, **m} for level, m in r["levels"].items()], ["level", "accuracy", "weighted_f1"]),
        "",
        "Backing off to the deepest level whose probability reaches a minimum confidence:",
        "",
        _md_table(
            [{"min confidence": t, **b} for t, b in r["backoff"].items()],
            ["min confidence", "leaf", "answered", "accuracy"],
        ),
        "",
    ]


def _report(r: dict, classes: list[str]) -> str:
    ab = r["ablation"]
    lines = [
        f"# Evaluation of `{r['run']}`",
        "",
        f"Model `{r['model']}`, {len(classes)} classes. Rows: {r['rows']} (`{r['embeddings']}`), "
        f"n = {r['n']} scored"
        + (
            f"; {r['unknown_label_rows']} rows with labels the run never saw were not scored: {r['unknown_labels']}"
            if r["unknown_label_rows"]
            else ""
        )
        + (f"; {r['unlabelled_rows']} rows with an empty label were not scored" if r.get("unlabelled_rows") else "")
        + ".",
        "",
        "## Metrics",
        "",
        _md_table([r], ["accuracy", "top3_accuracy", "top5_accuracy", "weighted_f1", "macro_f1", "n"]),
        "",
        *([r["note"], ""] if r.get("note") else []),
        *(_duplicates_lines(r["without_duplicates"]) if r.get("without_duplicates") else []),
        "Per class: [per_class.csv](per_class.csv). Per item: [predictions.csv](predictions.csv).",
        "",
        *(_hierarchy_lines(r) if r.get("levels") else []),
        "## Calibration",
        "",
        f"Temperature T = {r['temperature']:.4g}, fitted on the run's validation split "
        f"(n = {r['calibration'].get('val_n')}) and saved as `temperature.json` in the run folder"
        + (f"; T kept at 1 because {r['calibration']['val_kept_t1']}" if r["calibration"].get("val_kept_t1") else "")
        + (
            " (the scored rows ARE that split, so the calibrated ECE is in-sample)"
            if r["calibration"]["in_sample"]
            else ""
        )
        + ".",
        "",
        _md_table(
            [
                {"": "before", "ECE": r["ece"], "NLL": r["nll"]},
                {"": f"after (T={r['temperature']:.3g})", "ECE": r["ece_calibrated"], "NLL": r["nll_calibrated"]},
            ],
            ["", "ECE", "NLL"],
        ),
        "",
        "![reliability diagram](reliability.png)",
        "",
        "## Modality ablation",
        "",
        _md_table(
            [
                {"streams": name, **(ab[key] or {})}
                for name, key in (
                    ("image + text", "both"),
                    ("text only (image zeroed)", "no_image"),
                    ("image only (text zeroed)", "no_text"),
                )
            ],
            ["streams", "accuracy", "weighted_f1", "macro_f1"],
        ),
        "",
    ]
    if ab.get("gate_mean") is not None:
        lines += [
            f"Mean gate (image share of the fused vector): {ab['gate_mean']:.3f}; per class: "
            f"[gate_per_class.csv](gate_per_class.csv).",
            "",
        ]
    lines += [
        "## Confusions",
        "",
        "![confusion matrix](confusion.png)",
        "",
        _md_table(r["top_confusions"][:10], ["true", "pred", "count", "share_of_true"])
        if r["top_confusions"]
        else "No confusions.",
        "",
        "All: [confusions.csv](confusions.csv).",
        "",
    ]
    if r["per_group"]:
        lines += [
            f"## Per {r['group_col']}",
            "",
            _md_table(
                [{r["group_col"]: g, **m} for g, m in r["per_group"].items()],
                [r["group_col"], "accuracy", "top3_accuracy", "weighted_f1", "macro_f1", "ece", "n"],
            ),
            "",
        ]
        for g, m in r["per_group"].items():
            lines += [f"### {g}", "", f"![confusion {g}]({m['figure']})", ""]
            if m["top_confusions"]:
                lines += [_md_table(m["top_confusions"], ["true", "pred", "count", "share_of_true"]), ""]
    return "\n".join(lines)
