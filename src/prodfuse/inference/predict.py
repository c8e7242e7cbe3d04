"""What prediction writes and checks: the top-k prediction table, and whether shards fit a run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
TEXT_INPUTS = {"text", "tokens"}  # model inputs that carry text


def prediction_table(
    ids,
    probs: np.ndarray,
    classes: list[str],
    k: int,
    image_contribution=None,
    text_contribution=None,
    id_col: str = "product_id",
    true_labels=None,
    label_col: str = "label",
    hierarchy=None,
    min_confidence: float | None = None,
):
    """One row per item: id, [true label], label_1, prob_1, ..., label_k, prob_k, [pred_LEVEL, prob_LEVEL per level
    of a `hierarchy`, coarse to fine], image/text contribution. A level below `min_confidence` and every level after
    it are left empty: the path backs off to the deepest level that reaches it."""
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
    if hierarchy is not None:
        from prodfuse.modeling.hierarchy import answered_depth, best_paths

        paths = best_paths(hierarchy, probs.reshape(n, len(classes)), classes)
        depth = answered_depth(paths, min_confidence)
        for i, (level, (labels, p)) in enumerate(paths.items()):
            kept = depth > i
            cols[f"pred_{level}"] = np.where(kept, labels, None).astype(object)
            cols[f"prob_{level}"] = np.where(kept, np.round(p, 6), np.nan)
    for name, v in (("image_contribution", image_contribution), ("text_contribution", text_contribution)):
        cols[name] = np.round(np.asarray(v, dtype=np.float64), 6) if v is not None else np.full(n, np.nan)
    return pd.DataFrame(cols)


def check_compatible(
    config: dict, manifest: dict, folder: str | Path, streams=("image", "text"), strict: bool = False
) -> None:
    """Stop when shards were made with another backbone or text encoder than the run's training data (`config`: a
    run's or an align run's config.json), for the given streams. A tfidf encoder fitted on other texts is a warning,
    or with `strict` (vectors that are only compared, never checked by a label) an error."""
    trained = config["extraction"]["encoders"]
    got = manifest.get("encoders", {})
    keys = {"image": ("backbone", "dim"), "text": ("kind", "dim")}
    for stream in streams:
        for key in keys[stream]:
            a, b = trained.get(stream, {}).get(key), got.get(stream, {}).get(key)
            if a != b:
                raise ValueError(
                    f"Shards {str(folder)!r} were made with {stream} {key} {b!r} but the run was trained on "
                    f"{a!r}. Embed the data like the run's: `prodfuse predict --catalog CSV` does it, or "
                    f"`prodfuse extract --catalog CSV --like {config['embeddings']} --out FOLDER`."
                )
    # A tfidf encoder fitted on other texts gives vectors in another basis: same width, meaningless numbers.
    same = Path(folder).resolve() == Path(config["embeddings"]).resolve()
    like = manifest.get("settings", {}).get("like")
    if (
        "text" in streams
        and trained.get("text", {}).get("kind") == "tfidf"
        and not same
        and (like is None or Path(like).resolve() != Path(config["embeddings"]).resolve())
    ):
        if strict:
            raise ValueError(
                f"shards {str(folder)!r} have their own tfidf text encoder, fitted on other texts than the run's "
                f"({config['embeddings']}): their text vectors would mean nothing to it. Extract them with "
                f"`--like {config['embeddings']}`"
            )
        log.warning(
            "%s was not extracted with --like %s; its tfidf text encoder may be fitted on other texts "
            "than the run's, which makes the text stream meaningless.",
            folder,
            config["embeddings"],
        )


def text_column_map(
    run_cols,
    catalog_cols,
    text_cols=None,
    column_pairs: dict | None = None,
    needs_text: bool = True,
    allow_missing_text: bool = False,
    catalog: str = "the catalog",
) -> dict[str, str | None]:
    """{the run's text column: the catalog column that feeds it, or None}. `text_cols` (catalog columns) map in
    order onto the run's, `column_pairs` ({run column: catalog column}) by name; a run column left unmapped reads
    the catalog column of its own name. A catalog with none of them is an error (the model would see no text),
    unless `allow_missing_text` or the model reads no text (`needs_text` False)."""
    run_cols, catalog_cols = list(run_cols), [str(c) for c in catalog_cols]
    mapping: dict[str, str | None] = {c: c for c in run_cols}
    if text_cols is not None:
        text_cols = list(text_cols)
        if len(text_cols) > len(run_cols):
            raise ValueError(
                f"text_cols {text_cols} name {len(text_cols)} columns but the run was trained on {len(run_cols)}: "
                f"{run_cols}. Give at most {len(run_cols)}, in the order of the run's, or map each one with "
                f"--column RUN_COLUMN=CATALOG_COLUMN."
            )
        mapping.update(zip(run_cols, text_cols))
    for run_col, catalog_col in (column_pairs or {}).items():
        if run_col not in run_cols:
            raise ValueError(
                f"column mapping {run_col}={catalog_col}: {run_col!r} is not a text column of the run, which reads "
                f"{run_cols or 'no text column'}. Map one of those, e.g. --column "
                f"{(run_cols or ['title'])[0]}={catalog_col}."
            )
        mapping[run_col] = catalog_col
    named = list(dict.fromkeys([*(text_cols or []), *(column_pairs or {}).values()]))
    absent = [c for c in named if c not in catalog_cols]
    if absent:
        raise ValueError(
            f"{catalog} has no column {absent[0]!r} (named by --text-cols / --column); its columns are {catalog_cols}."
        )
    mapping = {r: (c if c in catalog_cols else None) for r, c in mapping.items()}
    if needs_text and run_cols and not any(mapping.values()) and not allow_missing_text:
        raise ValueError(
            f"{catalog} has none of the run's text columns {run_cols} (its columns are {catalog_cols}), so the "
            f"model would see no title or description and predict from the photo alone. Map yours in order with "
            f"--text-cols {','.join(['NAME'] * len(run_cols))} or by name with --column {run_cols[0]}=NAME, or pass "
            f"--allow-missing-text to predict without them."
        )
    return mapping


def check_inputs(config) -> dict:
    """What `predict` can check from file headers and the run's config.json, before loading any model: the run
    folder, the catalog and its columns (id, image, the run's text columns, the label) or the shard folder.
    Returns {"run": the run's config.json, "label_col": the catalog's label column or None, "text_columns":
    text_column_map's answer (a catalog) or None}."""
    from prodfuse.data.catalog import Columns, catalog_columns
    from prodfuse.modeling.hierarchy import HIERARCHY_FILE
    from prodfuse.modeling.run import read_run_config

    run = read_run_config(config.run)
    if config.min_confidence is not None and not (Path(config.run) / HIERARCHY_FILE).is_file():
        raise ValueError(
            f"--min-confidence {config.min_confidence} backs off along a category hierarchy, and the run "
            f"{config.run!r} has none (no {HIERARCHY_FILE}); train it with --label-cols COARSE,...,FINE, or leave "
            f"--min-confidence out"
        )
    if config.embeddings:
        if not (Path(config.embeddings) / "manifest.json").is_file():
            raise ValueError(
                f"embeddings {config.embeddings!r} is not an embedding shard folder: it has no manifest.json. Embed "
                f"a catalog like the run's data with `prodfuse predict --catalog CATALOG`, or `prodfuse extract "
                f"--catalog CATALOG --like {run.get('embeddings', 'TRAINING_SHARDS')} --out {config.embeddings}`."
            )
        return {"run": run, "label_col": run.get("label_col"), "text_columns": None}
    explicit_label = config.label_col is not None
    label = (config.label_col if explicit_label else run.get("label_col")) or None
    cols = Columns(id=config.id_col, image=config.image_col, text=(), label=label, split=None)
    # An explicit --label-col must be there; the run's own is used only where the catalog has it.
    present = catalog_columns(config.catalog, cols, require_label=explicit_label, encoding=config.encoding)
    inputs = set(run.get("inputs") or [])
    mapping = text_column_map(
        run.get("extraction", {}).get("columns", {}).get("text") or [],
        present,
        config.text_cols,
        config.column_pairs,
        needs_text=bool(inputs & TEXT_INPUTS) or not inputs,
        allow_missing_text=config.allow_missing_text,
        catalog=f"Catalog {config.catalog!r}",
    )
    return {"run": run, "label_col": label if label in present else None, "text_columns": mapping}
