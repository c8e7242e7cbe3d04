"""A run's model card: what it was trained on, with which encoders and fusion, how well it scores and where it is
weak, as a dict of facts (`model_card`) and as runs/NAME/MODEL_CARD.md (`write_model_card`).

The card is always rebuilt from the run folder's own files (config.json, metrics.json, temperature.json and the
evaluations `evaluate` records in evaluations.json), so it never disagrees with them and re-rendering it is
idempotent. Reads JSON only: no TensorFlow, so the service can return the facts cheaply.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from prodfuse.modeling.hierarchy import load_hierarchy
from prodfuse.modeling.run import TEMPERATURE_FILE, load_temperature, model_fingerprint, read_run_config

CARD_FILE = "MODEL_CARD.md"
EVALUATIONS_FILE = "evaluations.json"
# Classes with fewer training items than this are listed under known limits: their scores rest on a handful of
# photos, and a class needs 3 to get a val and a test item at all.
FEW_TRAINING_ITEMS = 5
METRIC_COLUMNS = ("accuracy", "top3_accuracy", "top5_accuracy", "weighted_f1", "macro_f1", "n")
METRIC_HEADERS = ("accuracy", "top-3", "top-5", "weighted F1", "macro F1", "n")
STREAMS = ("image", "text")


def fmt(value) -> str:
    """How the card writes a figure: floats to 4 decimals, missing ones as a dash (tests format the same way)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def jsonable(obj):
    """JSON-safe copy: numpy scalars become Python ones, and NaN/inf (an empty split's accuracy) None, which strict
    JSON encoders accept."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _file_name(value):
    """A weights or model reference without the server's folders: a path becomes its file name."""
    if not isinstance(value, str) or not (os.sep in value or "/" in value):
        return value
    return Path(value).name if Path(value).is_absolute() else value


# ---------------------------------------------------------------------------------------------------- facts


def _data(config: dict) -> dict:
    extraction = config.get("extraction") or {}
    splits = config.get("splits") or {}
    counts = {k: int(splits.get(k) or 0) for k in ("train", "val", "test")}
    unseen = splits.get("unseen_labels_excluded") or {}
    return {
        "catalog": extraction.get("catalog_path"),
        "shards": config.get("embeddings"),
        "val_shards": config.get("val_embeddings"),
        "test_shards": config.get("test_embeddings"),
        "rows": sum(counts.values()),
        "classes": config.get("num_classes"),
        "label_column": config.get("label_col"),
        "split": {
            "source": splits.get("source"),
            **counts,
            "unseen_label_rows_excluded": {k: sum(v.values()) for k, v in unseen.items()},
        },
    }


def _encoders(config: dict) -> dict:
    extraction = config.get("extraction") or {}
    settings, encoders = extraction.get("settings") or {}, extraction.get("encoders") or {}
    image = settings.get("image") or {}
    stored = encoders.get("image") or {}
    text = encoders.get("text") or {}
    minilm = text.get("minilm")
    ocr = settings.get("ocr_filter")
    return {
        "image": {
            "backbone": image.get("backbone") or stored.get("backbone") or settings.get("backbone"),
            "dim": image.get("dim") or stored.get("dim"),
            "views": stored.get("views", 1),
            "weights": _file_name(image.get("weights") or settings.get("weights")),
            "weights_sha256": image.get("weights_sha256"),
            "image_size": image.get("image_size") or settings.get("image_size"),
            "precision": image.get("precision"),
        },
        "text": {
            "kind": text.get("kind") or settings.get("text_encoder"),
            "dim": text.get("dim"),
            "parts": [{"kind": p.get("kind"), "dim": p.get("dim")} for p in text.get("parts") or []] or None,
            "minilm": {
                "model": _file_name(minilm.get("model")),
                "source": minilm.get("source"),
                "sha256": minilm.get("sha256"),
            }
            if minilm
            else None,
        },
        "ocr": {
            "engine": ocr.get("engine"),
            "version": ocr.get("version"),
            "models": ocr.get("models"),
            "langs": ocr.get("langs"),
        }
        if ocr
        else None,
    }


def _fusion(config: dict) -> dict:
    train = config.get("train") or config.get("args") or {}
    out = {
        "fusion": train.get("fusion"),
        "image_branch": train.get("image_branch"),
        "text_branch": train.get("text_branch"),
        "ensemble": train.get("ensemble", 1),
        "product_weights": None,
        "late_fusion": config.get("late_fusion"),  # stack or joint: best epochs, the stack's out-of-fold figures
    }
    # product fusion: one weight fit per ensemble member ("fit" is the first, "member_i" the others)
    fits = config.get("product_fusion") or {}
    if fits:
        out["product_weights"] = [
            {
                "member": name,
                "image": fit["product"]["weights"][0],
                "text": fit["product"]["weights"][1],
                # the linear probe as a third expert (train --probe-expert); absent: none
                "probe": fit["product"]["weights"][2] if len(fit["product"]["weights"]) > 2 else None,
                "fitted_on": fit.get("fitted_on"),
                "n": fit.get("n"),
                **{
                    f"val_{what}_{model}": fit[model][what]
                    for model in ("product", "image", "text")
                    for what in ("logloss", "accuracy")
                },
            }
            for name, fit in sorted(fits.items(), key=lambda kv: (kv[0] != "fit", kv[0]))
        ]
    return out


def _metrics(metrics: dict) -> dict:
    out = {name: metrics[name] for name in ("val", "test") if isinstance(metrics.get(name), dict)}
    streams = metrics.get("streams") or {}
    out["streams"] = {s: streams[s] for s in STREAMS if isinstance(streams.get(s), dict)} or None
    out["streams_how"] = streams.get("how")
    return out


def _hierarchy(run: Path, metrics: dict) -> dict | None:
    """The category levels of a run trained with label_cols and their figures per split; None without."""
    tree = load_hierarchy(run)
    if tree is None:
        return None
    splits = {name: metrics[name] for name in ("val", "test") if isinstance(metrics.get(name), dict)}
    return {
        "levels": list(tree.levels),
        "nodes": {level: len(tree.nodes(level)) for level in tree.levels},
        "label_parents": tree.label_parents,
        "conflicts": len(tree.conflicts),
        "splits": {
            name: {k: m.get(k) for k in ("levels", "consistent_paths", "backoff")}
            for name, m in splits.items()
            if "levels" in m
        },
    }


def _calibration(run: Path, config: dict) -> dict:
    # The fingerprint config.json recorded: hashing model.keras on every /v1/model request would cost more than
    # the rest of the card; Run.load warns when the two differ.
    fingerprint = config.get("model_sha256") or model_fingerprint(run)
    temperature, fitted = load_temperature(run, fingerprint)
    info = _read_json(run / TEMPERATURE_FILE) if fitted else {}
    return {
        "temperature": temperature,
        "fitted": fitted,
        **{k: info.get(k) for k in ("fitted_on", "n", "ece_before", "ece_after", "nll_before", "nll_after")},
        "kept_t1": info.get("kept_t1"),
    }


def _known_limits(config: dict, classes: list[str]) -> dict:
    counts = config.get("class_counts")
    splits = config.get("splits") or {}
    out = {
        "few_training_items_below": FEW_TRAINING_ITEMS,
        "few_training_items": None,
        "absent_from": None,
        "too_small_for_split": splits.get("too_small_for_split") or [],
        "unlabelled_rows": splits.get("unlabelled_rows") or 0,
        "unseen_labels_excluded": splits.get("unseen_labels_excluded") or {},
    }
    if counts is None:  # runs trained before the per-class counts were recorded
        return out
    train = counts.get("train") or {}
    out["few_training_items"] = [
        {"label": c, "items": int(train.get(c, 0))} for c in classes if int(train.get(c, 0)) < FEW_TRAINING_ITEMS
    ]
    # only splits that hold rows: an empty test split is said once in the data section, not per class
    out["absent_from"] = {
        name: [c for c in classes if not (counts.get(name) or {}).get(c)]
        for name in ("val", "test")
        if int(splits.get(name) or 0)
    }
    return out


def _evaluations(run: Path, fingerprint: str | None) -> list[dict]:
    """The recorded evaluations of this very model, in a stable order (another model's are stale: left out)."""
    found = _read_json(run / EVALUATIONS_FILE)
    return [e for _, e in sorted(found.items()) if fingerprint is None or e.get("model_sha256") == fingerprint]


def model_card(run_path: str | os.PathLike) -> dict:
    """The facts of a run folder's model card, JSON-serialisable (no NaN; paths only those config.json records for
    the catalog and shards): data, encoders, fusion, metrics, the category hierarchy (None without one),
    calibration, evaluations and known limits."""
    run = Path(run_path)
    config = read_run_config(run)  # a ValueError naming the folder when it is not a run folder
    classes = [str(c) for c in json.loads((run / "labels.json").read_text())]
    metrics = _read_json(run / "metrics.json")
    fingerprint = config.get("model_sha256")
    return jsonable(
        {
            "run": run.resolve().name,
            "model_sha256": fingerprint,
            "prodfuse_version": (config.get("versions") or {}).get("prodfuse"),
            "classes": classes,
            "data": _data(config),
            "encoders": _encoders(config),
            "fusion": _fusion(config),
            "metrics": _metrics(metrics),
            "hierarchy": _hierarchy(run, metrics),
            "calibration": _calibration(run, config),
            "evaluations": _evaluations(run, fingerprint),
            "known_limits": _known_limits(config, classes),
        }
    )


# ---------------------------------------------------------------------------------------------------- evaluations


def record_evaluation(run_path: str | os.PathLike, result: dict) -> Path:
    """Keep the figures of one `evaluate` result in the run's evaluations.json, one entry per evaluated shard
    folder and split: a re-evaluation replaces its entry, so the card shows it once."""
    run = Path(run_path)
    for key in ("embeddings", "split", "model_sha256"):
        if key not in result:
            raise ValueError(f"an evaluation result needs {key!r}; got keys {sorted(result)}")
    shards = str(result["embeddings"])
    out = Path(result["out"]).resolve() if result.get("out") else None
    entry = {
        "shards": shards,
        "split": result["split"],
        "rows": result.get("rows"),
        **{k: result.get(k) for k in METRIC_COLUMNS},
        **{k: result.get(k) for k in ("ece", "ece_calibrated", "nll", "nll_calibrated", "temperature")},
        "unknown_label_rows": result.get("unknown_label_rows", 0),
        "ablation": {k: v for k, v in (result.get("ablation") or {}).items() if k in ("both", "no_image", "no_text")},
        "without_duplicates": result.get("without_duplicates"),
        "per_group": {g: {"accuracy": m.get("accuracy"), "n": m.get("n")} for g, m in result["per_group"].items()}
        if result.get("per_group")
        else None,
        "group_col": result.get("group_col"),
        # a run with a category hierarchy: each level's accuracy
        "levels": {level: m.get("accuracy") for level, m in result["levels"].items()} if result.get("levels") else None,
        "note": result.get("note"),
        # the report folder only when it is inside the run: another location is a server path
        "report": str(out.relative_to(run.resolve())) if out and out.is_relative_to(run.resolve()) else None,
        "model_sha256": result["model_sha256"],
    }
    path = run / EVALUATIONS_FILE
    found = _read_json(path)
    found[f"{Path(shards).resolve()}::{result['split']}"] = jsonable(entry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(found, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file
    return path


# ---------------------------------------------------------------------------------------------------- Markdown


def _table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> list[str]:
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows] + [""]


def _data_lines(d: dict) -> list[str]:
    s = d["split"]
    lines = [
        "## Data",
        "",
        f"- Catalog: `{d['catalog']}`" if d["catalog"] else "- Catalog: not recorded",
        f"- Shards: `{d['shards']}`"
        + (f"; validation `{d['val_shards']}`" if d["val_shards"] else "")
        + (f"; test `{d['test_shards']}`" if d["test_shards"] else ""),
        f"- Rows: {d['rows']} (train {s['train']}, val {s['val']}, test {s['test']})",
        f"- Classes: {d['classes']}; label column `{d['label_column']}`",
        f"- Split: {s['source']}",
    ]
    dropped = s["unseen_label_rows_excluded"]
    if any(dropped.values()):
        lines.append(
            "- Rows left out because their label has no training item: "
            + ", ".join(f"{k} {n}" for k, n in dropped.items() if n)
        )
    return lines + [""]


def _encoder_lines(e: dict) -> list[str]:
    img, txt, ocr = e["image"], e["text"], e["ocr"]
    if img["weights_sha256"]:
        sha = f", sha256 `{img['weights_sha256']}`"
    else:  # Keras' own imagenet download, or no pretrained weights: the manifest records no file hash
        no_file = img["weights"] in (None, "none") or str(img["weights"]).startswith("random")
        sha = " (no weights file: no sha256)" if no_file else " (sha256 not recorded)"
    lines = [
        "## Encoders",
        "",
        f"- Image: {img['backbone']} ({img['dim']}-d, {img['image_size']} px, {img['precision']}), weights "
        f"{img['weights']}{sha}" + (f"; {img['views']} stored views per photo" if (img["views"] or 1) > 1 else "")
        if img["backbone"]
        else "- Image: not recorded in the shard manifest",
        (
            f"- Text: {txt['kind']} ({txt['dim']}-d)"
            + (" = " + " + ".join(f"{p['kind']} ({p['dim']}-d)" for p in txt["parts"]) if txt["parts"] else "")
        )
        if txt["kind"]
        else "- Text: not recorded in the shard manifest",
    ]
    if txt["minilm"]:
        m = txt["minilm"]
        lines.append(
            f"- Sentence model: {m['model']} (from {m['source']})"
            + (f", sha256 `{m['sha256']}`" if m["sha256"] else "")
        )
    lines.append(
        f"- OCR: {ocr['engine']} {ocr['version']}, languages {ocr['langs']}, models {ocr['models']}"
        if ocr
        else "- OCR: none"
    )
    return lines + [""]


def _fusion_lines(f: dict) -> list[str]:
    lines = [
        "## Fusion",
        "",
        f"`{f['fusion']}` fusion (image branch {f['image_branch']}, text branch {f['text_branch']}"
        + (f", ensemble of {f['ensemble']}" if (f["ensemble"] or 1) > 1 else "")
        + ").",
        "",
    ]
    if f["product_weights"]:
        n = f["product_weights"][0]["n"]
        probe = f["product_weights"][0].get("probe") is not None
        lines += [
            f"Fitted weights of softmax(a log p_image + b log p_text{' + c log p_probe' if probe else ''}), fitted on "
            f"validation (n = {n}), with the validation score of the fused model and of each stream alone "
            "(calibrated):",
            "",
            *_table(
                f["product_weights"],
                ["member", "image", "text"]
                + (["probe"] if probe else [])
                + ["val_logloss_product", "val_accuracy_product", "val_accuracy_image", "val_accuracy_text"],
                ["member", "a (image)", "b (text)"]
                + (["c (linear probe)"] if probe else [])
                + ["val log-loss", "val accuracy", "image alone", "text alone"],
            ),
        ]
    late = (f.get("late_fusion") or {}).get("fit")
    if f["fusion"] == "stack" and late:
        acc = late["oof_accuracy"]
        lines += [
            f"A multinomial logistic regression on both streams' log-probabilities, fitted on their {late['folds']}-fold "
            f"out-of-fold probabilities of the training rows (out-of-fold accuracy: image {acc['image']:.4f}, text "
            f"{acc['text']:.4f}).",
            "",
        ]
    elif f["fusion"] == "joint" and late:
        lines += [
            "Both stream models frozen; a head on their branch vectors and logits trained on the training rows, "
            f"stopped on validation (best epochs: {late['best_epoch']}).",
            "",
        ]
    return lines


def _metric_lines(m: dict) -> list[str]:
    rows = []
    for split in ("val", "test"):
        if split in m:
            rows.append({"split": split, "model": "fused", **m[split]})
        for stream in STREAMS:
            if m["streams"] and split in m["streams"].get(stream, {}):
                rows.append({"split": split, "model": f"{stream} alone", **m["streams"][stream][split]})
    columns = ["split", "model", *METRIC_COLUMNS]
    lines = ["## Metrics", "", "From `metrics.json`, on the run's own splits."]
    if m["streams_how"]:
        lines[-1] += f" Each stream alone: {m['streams_how']}."
    table = _table(rows, columns, ["split", "model", *METRIC_HEADERS]) if rows else ["No val or test metrics.", ""]
    return lines + ["", *table]


def _calibration_lines(c: dict) -> list[str]:
    lines = ["## Calibration", ""]
    if not c["fitted"]:
        return lines + [
            "Not calibrated yet (T = 1): `prodfuse evaluate` fits a temperature on the validation split.",
            "",
        ]
    lines.append(
        f"Temperature T = {c['temperature']:.4g}, fitted on the {c['fitted_on'] or 'val'} split "
        f"(n = {fmt(c['n'])})" + (f"; kept at 1 because {c['kept_t1']}" if c["kept_t1"] else "") + "."
    )
    if c["ece_before"] is not None:
        lines += [
            "",
            *_table(
                [
                    {"": "before", "ECE": c["ece_before"], "NLL": c["nll_before"]},
                    {"": "after", "ECE": c["ece_after"], "NLL": c["nll_after"]},
                ],
                ["", "ECE", "NLL"],
            ),
        ]
    else:
        lines.append("")
    return lines


def _evaluation_lines(e: dict) -> list[str]:
    lines = [
        f"### `{e['split']}` rows of `{e['shards']}`",
        "",
        f"Rows: {e['rows']}" + (f"; report in `{e['report']}/`" if e["report"] else "") + ".",
        "",
        *_table([e], [*METRIC_COLUMNS, "ece", "ece_calibrated"], [*METRIC_HEADERS, "ECE", "ECE (T)"]),
    ]
    ab = e["ablation"]
    ablation = [
        {"streams": name, **(ab.get(key) or {})}
        for name, key in (
            ("image + text", "both"),
            ("image alone (text zeroed)", "no_text"),
            ("text alone (image zeroed)", "no_image"),
        )
        if ab.get(key)
    ]
    if len(ablation) > 1:
        lines += _table(
            ablation,
            ["streams", "accuracy", "weighted_f1", "macro_f1"],
            ["streams", "accuracy", "weighted F1", "macro F1"],
        )
    if e["unknown_label_rows"]:
        lines += [f"{e['unknown_label_rows']} rows with labels the run never saw were not scored.", ""]
    wd = e.get("without_duplicates")
    if wd:
        lines += [
            f"Without the {wd['duplicates']} items with a near-duplicate photo in `{wd['against']}`: accuracy "
            f"{fmt(wd.get('accuracy'))} (n = {wd.get('n')}).",
            "",
        ]
    if e["per_group"]:
        lines += _table(
            [{e["group_col"]: g, **m} for g, m in e["per_group"].items()], [e["group_col"], "accuracy", "n"]
        )
    if e.get("levels"):
        lines += ["Accuracy per level: " + ", ".join(f"{k} {fmt(v)}" for k, v in e["levels"].items()) + ".", ""]
    if e["note"]:
        lines += [e["note"], ""]
    return lines


def _hierarchy_lines(h: dict) -> list[str]:
    lines = [
        "## Category hierarchy",
        "",
        "Levels, coarse to fine: "
        + " > ".join(f"`{level}` ({h['nodes'][level]})" for level in h["levels"])
        + ". The model learns the finest; a coarser level's probability is the sum of its labels', and the predicted "
        "path is the most probable label's."
        + (
            f" {h['conflicts']} label(s) had rows under several parents; each kept its most frequent "
            "(`hierarchy.json`)."
            if h["conflicts"]
            else ""
        ),
        "",
    ]
    if not h["splits"]:
        return lines
    levels = h["levels"]
    rows = [
        {"split": name, **{level: m["levels"][level]["accuracy"] for level in levels}, "paths": m["consistent_paths"]}
        for name, m in h["splits"].items()
    ]
    lines += _table(
        rows, ["split", *levels, "paths"], ["split", *[f"{x} accuracy" for x in levels], "consistent paths"]
    )
    name = "test" if "test" in h["splits"] else next(iter(h["splits"]))
    backoff = [{"min": t, **b} for t, b in h["splits"][name]["backoff"].items()]
    lines += [
        f"Backing off on {name} to the deepest level whose probability reaches a minimum confidence:",
        "",
        *_table(
            backoff, ["min", "leaf", "answered", "accuracy"], ["min confidence", "finest level", "answered", "accuracy"]
        ),
    ]
    return lines


def _limit_lines(k: dict) -> list[str]:
    lines = ["## Known limits", ""]
    few = k["few_training_items"]
    if few is None:
        lines.append("- Per-class item counts were not recorded for this run (trained by an older prodfuse).")
    elif few:
        lines.append(
            f"- Classes with fewer than {k['few_training_items_below']} training items: "
            + ", ".join(f"`{c['label']}` ({c['items']})" for c in few)
        )
    else:
        lines.append(f"- Every class has at least {k['few_training_items_below']} training items.")
    for split, absent in (k["absent_from"] or {}).items():
        if absent:
            lines.append(
                f"- Classes absent from {split} (their {split} scores are unmeasured): "
                + ", ".join(f"`{c}`" for c in absent)
            )
    if k["too_small_for_split"]:
        lines.append(
            "- Too small to split (all their items train): "
            + ", ".join(f"`{c['label']}` ({c['items']})" for c in k["too_small_for_split"])
        )
    if k["unlabelled_rows"]:
        lines.append(f"- Rows with an empty label (unlabelled, in no split): {k['unlabelled_rows']}")
    for split, labels in k["unseen_labels_excluded"].items():
        if labels:
            lines.append(
                f"- {split} rows whose label has no training item (not scored): "
                + ", ".join(f"`{c}` ({n})" for c, n in labels.items())
            )
    return lines + [""]


def render_model_card(card: dict) -> str:
    """The Markdown of a `model_card` dict."""
    lines = [
        f"# Model card: `{card['run']}`",
        "",
        f"Model sha256 `{card['model_sha256']}`"
        + (f", trained by prodfuse {card['prodfuse_version']}" if card["prodfuse_version"] else "")
        + ". Written by `prodfuse train` and updated by `prodfuse evaluate`; the figures are those of the run "
        "folder's `metrics.json`, `temperature.json` and evaluations.",
        "",
        *_data_lines(card["data"]),
        *_encoder_lines(card["encoders"]),
        *_fusion_lines(card["fusion"]),
        *_metric_lines(card["metrics"]),
        *(_hierarchy_lines(card["hierarchy"]) if card.get("hierarchy") else []),
        *_calibration_lines(card["calibration"]),
    ]
    if card["evaluations"]:
        lines += ["## Evaluations", ""]
        for e in card["evaluations"]:
            lines += _evaluation_lines(e)
    lines += _limit_lines(card["known_limits"])
    return "\n".join(lines).rstrip("\n") + "\n"


def write_model_card(run_path: str | os.PathLike) -> Path:
    """Render the run's card to run_path/MODEL_CARD.md (replaced whole, atomically); returns its path."""
    run = Path(run_path)
    text = render_model_card(model_card(run))
    path = run / CARD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
