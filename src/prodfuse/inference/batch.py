"""`predict` on a whole catalog or shard folder: a loop over a Predictor that writes a predictions CSV."""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from prodfuse.data.catalog import PATH_REJECT_DETAILS, Columns, read_catalog, resolve_image_paths
from prodfuse.inference.config import PredictConfig
from prodfuse.inference.forward import contributions
from prodfuse.inference.predict import check_inputs, prediction_table
from prodfuse.inference.predictor import Predictor

log = logging.getLogger(__name__)
CATALOG_BATCH = 256  # items per Predictor call: one backbone batch, bounded memory on any catalog size


def rejects_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "_rejects.csv")


def predict(config: PredictConfig, predictor: Predictor | None = None, on_batch=None) -> dict:
    """Write top-k predictions of every catalog row (or shard row) to `config.out`; rows that cannot be embedded go
    to <out stem>_rejects.csv with their reason. `on_batch(done, total)` reports progress. Returns a summary."""
    out = Path(config.out)
    if out.is_dir():
        raise ValueError(f"out {config.out!r} is a folder; pass a CSV file path such as {config.out}/predictions.csv")
    checked = check_inputs(config)  # columns and folders, before the model loads
    predictor = predictor or Predictor.from_run(
        config.run,
        ocr_workers=config.ocr_workers,
        ocr_cache=config.ocr_cache,
        batch_size=min(config.batch_size, 256),
        trust_pickle=config.trust_pickle,
    )
    run = predictor.run
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects = []
    if config.embeddings:
        table = predictor.predict_shards(config.embeddings, config.top_k, config.min_confidence)
        id_col, with_label = table.columns[0], run.label_col in table.columns
    else:
        # {the run's text column: the catalog's column feeding it}: items are keyed by the run's names.
        mapping = {r: c for r, c in checked["text_columns"].items() if c is not None}
        label = checked["label_col"]
        cols = Columns(
            id=config.id_col,
            image=config.image_col,
            text=tuple(dict.fromkeys(mapping.values())),
            label=label,
            split=config.split_col,
        )
        df = read_catalog(config.catalog, cols, require_label=False, encoding=config.encoding)
        with_label = label is not None
        if predictor.text_cols and not mapping:
            log.warning(
                "%s has none of the run's text columns %s: predicting from the photo%s alone",
                config.catalog,
                predictor.text_cols,
                " and OCR" if run.extraction.get("settings", {}).get("ocr", "none") != "none" else "",
            )
        has_text = np.zeros(len(df), bool)
        for c in cols.text:
            has_text |= df[c].astype(str).str.strip().ne("").to_numpy()
        paths, path_rejects = resolve_image_paths(df, config.catalog, cols.image)
        id_col = cols.id
        tables = []
        n = len(df)
        for s in range(0, n, CATALOG_BATCH):
            rows = range(s, min(n, s + CATALOG_BATCH))
            for i in rows:
                if path_rejects[i] is not None:
                    reason = path_rejects[i]
                    rejects.append(
                        {
                            "id": df[id_col].iat[i],
                            "path": paths[i],
                            "reason": reason,
                            "detail": PATH_REJECT_DETAILS[reason],
                        }
                    )
            kept = [i for i in rows if path_rejects[i] is None]
            items = [{"image": paths[i], **{r: df[c].iat[i] for r, c in mapping.items()}} for i in kept]
            ok, extras, res = predictor.forward_items(items) if items else ([], [], None)
            for j, e in enumerate(extras):
                if e["error"]:
                    reason, _, detail = e["error"].partition(": ")
                    i = kept[j]
                    rejects.append({"id": df[id_col].iat[i], "path": paths[i], "reason": reason, "detail": detail})
            if ok:
                rows_ok = [kept[j] for j in ok]
                img_c, txt_c = contributions(res)
                tables.append(
                    prediction_table(
                        df[id_col].to_numpy()[rows_ok],
                        res["probs"],
                        run.classes,
                        config.top_k,
                        img_c,
                        txt_c,
                        id_col=id_col,
                        true_labels=df[label].to_numpy()[rows_ok] if with_label else None,
                        label_col=label or "label",
                        hierarchy=run.hierarchy,
                        min_confidence=config.min_confidence,
                    )
                )
            if on_batch:
                on_batch(min(n, s + CATALOG_BATCH), n)
        table = (
            pd.concat(tables, ignore_index=True)
            if tables
            else prediction_table(
                [],
                np.zeros((0, len(run.classes))),
                run.classes,
                config.top_k,
                id_col=id_col,
                true_labels=[] if with_label else None,
                label_col=label or "label",
                hierarchy=run.hierarchy,
            )
        )
        with open(rejects_path(out), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "path", "reason", "detail"])
            w.writeheader()
            w.writerows(rejects)
    tmp = out.with_name(out.name + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    summary = {
        "predictions": str(out),
        "n": len(table),
        "rejected": len(rejects),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "temperature": run.temperature,
        "calibrated": run.calibrated,
        "run": str(run.path),
        "model": run.model.name,
        "rejects": str(rejects_path(out)) if config.catalog else None,
    }
    if config.catalog:
        summary["text_columns"] = checked["text_columns"]
        summary["rows_with_text"] = int(has_text.sum())
        summary["input_rows"] = len(df)
        summary["label_col"] = label
    if run.hierarchy is not None:  # how deep the answers go: all at the finest level without min_confidence
        levels = run.hierarchy.levels
        depth = sum(table[f"pred_{level}"].notna().to_numpy().astype(int) for level in levels)
        summary["hierarchy"] = {
            "levels": list(levels),
            "min_confidence": config.min_confidence,
            "answered_at": {
                **{level: int((depth == i + 1).sum()) for i, level in enumerate(levels)},
                "none": int((depth == 0).sum()),
            },
        }
    label_col = run.label_col if config.embeddings else (label or "label")
    if with_label and len(table):
        known = table[label_col].astype(str).isin(run.classes)
        if known.any():
            summary["accuracy_known_labels"] = float(
                (table["label_1"][known] == table[label_col][known].astype(str)).mean()
            )
            summary["n_known_labels"] = int(known.sum())
    return summary
