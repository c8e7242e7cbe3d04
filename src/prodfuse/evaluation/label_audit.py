"""Likely mislabelled products: out-of-fold probabilities, then cleanlab's confident learning.

Every labelled row is scored by a model that never trained on it. The rows are dealt into stratified K folds exactly
as `train --folds` and `compare --folds` deal them (`splits.make_splits`): for fold k the default model is one
`train` run (compare's per-fold TrainConfig) whose test split is fold k, fold k+1 validating its early stopping; the
linear probe is fitted on every fold but k. cleanlab's `find_label_issues` then flags the rows whose given label
disagrees with what the models learned from the rest of the catalog, ranked by self-confidence (the given label's
out-of-fold probability, lowest first).

Classes with fewer items than folds are left out of the ranking: too few of their items train each fold's model
for their probabilities to mean much (under 3 items, `kfold_split` never holds one out at all). They still take part
in training, and the summary lists them for a look by hand.

A row whose label cell is empty (`shards.empty_cells`) is unlabelled, as `train` has it: it is in no fold, neither
trained on nor scored, and the summary counts it ("unlabelled_rows"); pred_probs.npz keeps it (audited False, NaN).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from prodfuse.data import shards
from prodfuse.evaluation.config import AuditLabelsConfig, CompareConfig
from prodfuse.modeling.config import TrainConfig
from prodfuse.retrieval.duplicates import excerpt

log = logging.getLogger(__name__)

ISSUE_COLUMNS = ["id", "rank", "given_label", "suggested_label", "suggested_prob", "given_prob", "image_path", "text"]
SUMMARY_COLUMNS = ["given_label", "suggested_label", "count"]
TEXT_CHARS = 120  # a title's length: the excerpt a reviewer reads beside the photo
THUMB_PX = 128
INTERNAL = {"has_text", "text", "ocr_text", "tokens"}


def _carried(present: list[str]) -> list[str]:
    return [c for c in present if c not in shards.EMBEDDING_COLUMNS and c not in INTERNAL]


def check_label_audit(config: AuditLabelsConfig) -> dict:
    """The shard folder and its label column, from the manifest and the parquet schema (no rows read): what
    `audit_labels` needs before it reads or writes anything. Returns {"manifest", "label_col", "columns"}."""
    emb = Path(config.embeddings)
    manifest = shards.read_manifest(emb)
    present = shards.shard_columns(emb)
    # a manifest without the key (hand-made, older) means "label", as train reads it; extract records None for an
    # unlabelled catalog
    label_col = config.label_col or manifest["columns"].get("label", "label")
    if label_col is None:
        raise ValueError(
            f"embeddings {str(emb)!r} is an unlabelled shard folder (extracted without a label column), so there "
            f"are no labels to audit. Pass label_col (--label-col) naming one of the columns its shards carry "
            f"{_carried(present)}, or re-extract the catalog with --label-col."
        )
    if label_col not in present:
        raise ValueError(
            f"label_col {label_col!r} is not a column of the shards in {str(emb)!r}; they carry {_carried(present)}. "
            f"Pass --label-col with one of those."
        )
    return {"manifest": manifest, "label_col": label_col, "columns": present}


def fold_test_rows(labels: np.ndarray, folds: int, seed: int, label_col: str = "label") -> list[np.ndarray]:
    """The rows each fold scores: the test split of `train --folds K --fold k` on these labels (no split column),
    planned as train plans it (`splits.plan_labelled_splits`): folds of the labelled rows, as positions among all
    rows; a row with an empty label is in none."""
    from prodfuse.data.splits import plan_labelled_splits

    return [
        plan_labelled_splits({"main": labels}, None, None, seed, label_col=label_col, folds=folds, fold=k)[0]["test"][1]
        for k in range(folds)
    ]


def _probe_oof(
    emb: Path, labels: np.ndarray, labelled: np.ndarray, classes: list[str], tests: list[np.ndarray], seed: int
) -> np.ndarray:
    """The linear probe's out-of-fold probabilities [rows, classes], fitted on the `labelled` rows (a mask) outside
    each fold; NaN rows were never held out (unlabelled rows among them)."""
    from prodfuse.data.sequence import load_inputs
    from prodfuse.evaluation.probes import fit_probe, probe_features

    present = shards.shard_columns(emb)
    columns = {"image": "image_embedding", "text": "text_embedding", "image_views": "image_views"}
    arrays = load_inputs(emb, [i for i, c in columns.items() if c in present])
    streams = tuple(s for s in ("image", "text") if s in arrays)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(c, -1) for c in labels], dtype=np.int64)  # -1: unlabelled, never fitted on
    probs = np.full((len(labels), len(classes)), np.nan)
    everything = np.flatnonzero(labelled)
    for k, test in enumerate(tests):
        fit = np.setdiff1d(everything, test)
        log.info("fold %d/%d: linear probe on %d rows, scoring %d", k + 1, len(tests), len(fit), len(test))
        views = probe_features(arrays, streams, fit)
        predict = fit_probe(np.concatenate(views), np.tile(y[fit], len(views)), len(classes), seed=seed)
        probs[test] = np.mean([predict(x) for x in probe_features(arrays, streams, test)], axis=0)
    return probs


def _trained_oof(
    config: AuditLabelsConfig, label_col: str, labels: np.ndarray, classes: list[str], tests: list, work: Path
) -> dict[str, np.ndarray]:
    """{"fused"|"image"|"text": out-of-fold probabilities} of `config.model` trained once per fold; a product-fusion
    model brings its own single-stream models' probabilities too (trained alone, so free)."""
    import keras

    from prodfuse.data.sequence import load_inputs
    from prodfuse.evaluation.compare import repetitions, text_branch_for, train_config
    from prodfuse.modeling.model import model_inputs
    from prodfuse.modeling.probabilities import stream_models
    from prodfuse.modeling.training import predict_probs, train

    emb = Path(config.embeddings)
    # compare's fold machinery: its TrainConfig per fold is train's defaults plus these shared settings; split_col ""
    # folds every labelled row, whatever a split column says (a row marked test can be mislabelled too); train
    # leaves the unlabelled rows out of every fold, as `fold_test_rows` does
    shared = CompareConfig(
        embeddings=str(emb),
        folds=config.folds,
        label_col=label_col,
        split_col="",
        epochs=config.epochs,
        patience=config.patience,
        batch_size=config.batch_size,
        seed=config.seed,
        out=str(work),
        overwrite=True,
    )
    model = TrainConfig.fusion if config.model == "default" else config.model
    text_branch = text_branch_for(emb)
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {}
    arrays = None
    for rep in repetitions(shared):
        k, test = rep["fold"], tests[rep["fold"]]
        log.info("fold %d/%d: training the %s model, scoring %d rows", k + 1, config.folds, config.model, len(test))
        keras.backend.clear_session()  # each run starts from a clean graph and the same seed, as compare's
        tc = train_config(shared, model, work / rep["name"], text_branch, rep["seed"], k)
        run = train(dataclasses.replace(tc, verbose=config.verbose))
        if run.config["splits"]["test"] != len(test):
            raise RuntimeError(f"fold {k}: the run scored {run.config['splits']['test']} rows, expected {len(test)}")
        if arrays is None:  # every fold's run takes the same inputs
            arrays = load_inputs(emb, run.inputs)
        cols = [index[c] for c in run.classes]
        parts = stream_models(run.model)
        scored = {"fused": run.model}
        if parts:
            scored.update(image=parts[0], text=parts[1])
        for name, m in scored.items():
            names = model_inputs(m) if name != "fused" else list(arrays)
            sub = {n: v for n, v in arrays.items() if n in names or (n == "image_views" and "image" in names)}
            block = np.zeros((len(test), len(classes)))
            block[:, cols] = predict_probs(m, sub, test)  # classes this fold never trained on keep 0
            out.setdefault(name, np.full((len(labels), len(classes)), np.nan))[test] = block
    return out


def _thumbnail(path: Path) -> str | None:
    """A JPEG data URI of the photo resized to fit THUMB_PX, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _html(issues: pd.DataFrame, image_root: Path, title: str, note: str) -> str:
    e = html.escape
    rows = []
    for r in issues.itertuples(index=False):
        p = Path(str(r.image_path)) if isinstance(r.image_path, str) and r.image_path else None
        uri = _thumbnail(p if p is None or p.is_absolute() else image_root / p) if p else None
        img = f'<img src="{uri}" alt="{e(str(r.id))}">' if uri else '<div class="none">no photo</div>'
        rows.append(
            f"<tr><td>{r.rank}</td><td>{img}</td><td><b>{e(str(r.id))}</b><br>{e(str(r.text or ''))}</td>"
            f'<td class="given">{e(str(r.given_label))}<br><small>p = {r.given_prob:.3f}</small></td>'
            f'<td class="sugg">{e(str(r.suggested_label))}<br><small>p = {r.suggested_prob:.3f}</small></td></tr>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border-bottom:1px solid #ddd;padding:6px 10px;text-align:left;vertical-align:middle}"
        f"img,.none{{max-width:{THUMB_PX}px;max-height:{THUMB_PX}px}}"
        f".none{{width:{THUMB_PX}px;color:#888;font-size:small}}.given{{color:#a00}}.sugg{{color:#070}}"
        f"</style></head><body><h1>{e(title)}</h1><p>{e(note)}</p><table>"
        "<tr><th>rank</th><th>photo</th><th>product</th><th>given label</th><th>suggested label</th></tr>"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )


def audit_labels(config: AuditLabelsConfig) -> dict:
    """Rank the likely mislabelled rows of `config.embeddings`; writes label_issues.csv (id, rank, given_label,
    suggested_label, suggested_prob, given_prob, image_path, text), label_issues_summary.csv (count per given ->
    suggested pair), label_issues.html (the `top` suspects, thumbnails embedded), label_audit.json (what this
    returns) and pred_probs.npz (the out-of-fold probabilities of every row, NaN where a row was not scored). Rows
    with an empty label are not audited (in no fold) and are counted as "unlabelled_rows"."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as e:
        raise ImportError(
            f"audit --labels needs cleanlab ({e}); install it with `pip install 'prodfuse[quality]'`"
        ) from None

    t0 = time.perf_counter()
    emb = Path(config.embeddings)
    checked = check_label_audit(config)
    manifest, label_col, present = checked["manifest"], checked["label_col"], checked["columns"]
    id_col = manifest["columns"]["id"]
    image_col = manifest["columns"].get("image") or "image_path"
    wanted = [id_col, label_col] + [c for c in (image_col, "text") if c in present and c not in (id_col, label_col)]
    items = shards.read_shards(emb, list(dict.fromkeys(wanted)))
    # an empty cell is an unlabelled row, as train has it: in no fold, neither trained on nor scored
    labels = shards.label_strings(items[label_col]).astype(str)
    empty = labels == ""
    if empty.all():
        raise ValueError(
            f"label_col {label_col!r} is empty (None, NaN or blank) in every one of the {len(labels)} rows of "
            f"{str(emb)!r}: unlabelled rows are not audited, so there is nothing to audit. Fill {label_col!r} in "
            f"the catalog and re-extract, or pass --label-col with a column that holds the labels."
        )
    labelled = ~empty
    classes, counts = np.unique(labels[labelled], return_counts=True)
    classes = classes.tolist()
    left_out = {c: int(n) for c, n in zip(classes, counts) if n < config.folds}
    kept = [c for c in classes if c not in left_out]
    if len(kept) < 2:
        raise ValueError(
            f"label_col {label_col!r} of {str(emb)!r} has {len(kept)} class(es) with at least folds={config.folds} "
            f"items ({dict(zip(classes, counts.tolist()))}); an audit needs 2. Lower --folds (3 at least) or audit "
            f"a column with more items per class."
        )

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)  # every check above passed: from here on files are written
    tests = fold_test_rows(labels, config.folds, config.seed, label_col)
    if config.model == "lr":
        probs = {"fused": _probe_oof(emb, labels, labelled, classes, tests, config.seed)}
    else:
        # the fold runs are scaffolding: their probabilities are kept in pred_probs.npz, the models are not
        with tempfile.TemporaryDirectory(prefix=".fold-runs-", dir=out) as work:
            probs = _trained_oof(config, label_col, labels, classes, tests, Path(work))
    p = probs["fused"]

    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(c, -1) for c in labels], dtype=np.int64)  # -1: unlabelled
    audited = labelled & ~np.isin(labels, list(left_out)) & ~np.isnan(p).any(axis=1)
    rows = np.flatnonzero(audited)
    # confident learning over the audited classes only: a left-out class has no rows to estimate its noise from
    cols = np.array([index[c] for c in kept])
    sub = p[np.ix_(rows, cols)]
    sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1e-12)
    remap = {int(c): i for i, c in enumerate(cols)}
    y_sub = np.array([remap[int(v)] for v in y[rows]], dtype=np.int64)
    # n_jobs=1: a library call does not start a process pool on a machine it shares
    flagged = rows[find_label_issues(y_sub, sub, return_indices_ranked_by="self_confidence", n_jobs=1)]

    given_prob = p[flagged, y[flagged]]
    other = p[flagged].copy()
    other[np.arange(len(flagged)), y[flagged]] = -1.0  # the suggestion is the likeliest *other* class
    suggested = other.argmax(axis=1)
    text = items.get("text", np.full(len(labels), "", dtype=object))
    paths = items.get(image_col, np.full(len(labels), "", dtype=object))
    issues = pd.DataFrame(
        {
            "id": [str(v) for v in items[id_col][flagged]],
            "rank": np.arange(1, len(flagged) + 1),
            "given_label": labels[flagged],
            "suggested_label": [classes[i] for i in suggested],
            "suggested_prob": np.round(p[flagged, suggested], 4),
            "given_prob": np.round(given_prob, 4),
            "image_path": ["" if v is None else str(v) for v in paths[flagged]],
            "text": [excerpt(str(v or ""), TEXT_CHARS) for v in text[flagged]],
        },
        columns=ISSUE_COLUMNS,
    )
    pairs = (
        issues.groupby(["given_label", "suggested_label"]).size().reset_index(name="count")
        if len(issues)
        else pd.DataFrame(columns=SUMMARY_COLUMNS)
    )
    pairs = pairs.sort_values(["count", "given_label", "suggested_label"], ascending=[False, True, True])
    issues.to_csv(out / "label_issues.csv", index=False)
    pairs[SUMMARY_COLUMNS].to_csv(out / "label_issues_summary.csv", index=False)

    how = {
        "default": f"the default model ({TrainConfig.fusion} fusion)",
        "lr": "the linear probe on [L2(image); text]",
        "image": "the image model alone",
        "text": "the text model alone",
    }[config.model]
    note = (
        f"{len(flagged)} of {len(rows)} audited rows flagged by confident learning on the out-of-fold probabilities "
        f"of {how}, {config.folds} folds; ranked by the given label's probability, lowest first."
        + (
            f" Left out: {len(left_out)} class(es) with fewer than {config.folds} items "
            f"({sum(left_out.values())} rows)."
            if left_out
            else ""
        )
        + (f" Not audited: {int(empty.sum())} row(s) with an empty label." if empty.any() else "")
    )
    top = issues.head(config.top)
    catalog_dir = Path(manifest.get("catalog_path") or ".").parent
    page = _html(top, catalog_dir, f"Likely mislabelled products: {emb.name} ({label_col})", note)
    (out / "label_issues.html").write_text(page, encoding="utf-8")
    np.savez_compressed(
        out / "pred_probs.npz",
        ids=np.array([str(v) for v in items[id_col]]),
        labels=labels,
        classes=np.array(classes),
        audited=audited,
        **{("probs" if k == "fused" else f"probs_{k}"): v.astype(np.float32) for k, v in probs.items()},
    )
    summary = {
        "embeddings": str(emb),
        "label_col": label_col,
        "model": config.model,
        "folds": config.folds,
        "seed": config.seed,
        "rows": int(len(labels)),
        "unlabelled_rows": int(empty.sum()),  # an empty label: in no fold, not audited
        "classes": len(classes),
        "audited_rows": int(len(rows)),
        "out_of_fold_accuracy": float((p[rows].argmax(axis=1) == y[rows]).mean()),
        "issues": int(len(flagged)),
        "in_html": int(len(top)),
        "pairs": [
            {"given_label": str(a), "suggested_label": str(b), "count": int(n)}
            for a, b, n in pairs[SUMMARY_COLUMNS].head(10).itertuples(index=False)
        ],
        "left_out": {
            "rule": f"classes with fewer than folds={config.folds} items are not ranked (they still train)",
            "classes": left_out,
            "rows": int(sum(left_out.values())),
        },
        "note": note,
        "seconds": round(time.perf_counter() - t0, 1),
        "out": str(out),
        "files": [
            "label_issues.csv",
            "label_issues_summary.csv",
            "label_issues.html",
            "label_audit.json",
            "pred_probs.npz",
        ],
    }
    (out / "label_audit.json").write_text(json.dumps(summary, indent=1))
    return summary
