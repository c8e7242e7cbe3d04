"""How well `prodfuse audit --labels` finds labels known to be wrong: injected noise on fashion train + val.

    python benchmarks/label_audit.py [--models lr,default,image,text] [--folds 5] [--noise 0.05] [--seed 0] [--out DIR]

Fashion (`article_type`, 135 classes; shards made as tests/test_accuracy.py's fashion_shards(), cached), its
train and val rows. 5% of them (seeded) get a wrong label: half a random other class, half the class the clean
model confuses the row's own class with most (the clean out-of-fold linear probe's confusion matrix: the realistic
case). Flipped rows and their new classes are drawn from classes with at least MIN_CLASS_ITEMS items, so every
flipped row lands in a class the audit ranks. The noisy labels are written as a column of a copy of the shards,
and `audit_labels` runs on it once per model:
- lr: the linear probe on [L2(image); text];
- default: the default model (product fusion), one `train` run per fold;
- image, text: its single streams trained alone (taken from the default model's folds when both are asked for).

For each: precision and recall at k = the number flipped of the ranking by self-confidence (the given label's
out-of-fold probability, lowest first), the area under the precision-recall curve of that ranking (average
precision), precision and recall of the rows cleanlab flags, and the recall at k of the confused flips, the random
ones and the flips that stay in the same sub-category (the hard ones). The clean labels have mislabels of their own,
which the ranking finds and the score counts as false positives: how many of those at k the clean-label audit
(the linear probe's) already flags, and the precision at k with its flagged rows that were not flipped left out.
Last printed line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import prodfuse  # noqa: E402
from prodfuse.data import shards  # noqa: E402
from prodfuse.evaluation.config import AuditLabelsConfig  # noqa: E402

LABEL, NOISY = "article_type", "noisy_label"
MIN_CLASS_ITEMS = 10  # a flipped row's class and its new class: enough items to stay ranked at the usual --folds
MODELS = ("lr", "default", "image", "text")


def train_val_copy(src: Path, dst: Path, noisy: np.ndarray | None, keep: np.ndarray) -> Path:
    """The `keep` rows of `src` as a new shard folder, with `noisy` as the NOISY column (the label it records)."""
    manifest = shards.read_manifest(src)
    data = shards.read_shards(src, rows=keep)
    columns = {**manifest["columns"], "label": NOISY if noisy is not None else LABEL}
    header = {k: manifest[k] for k in ("catalog_path", "catalog_sha256", "settings", "encoders", "versions")}
    m = shards.open_shards(dst, {**header, "columns": columns}, overwrite=True)
    if noisy is not None:
        data[NOISY] = noisy
    n, step = len(keep), 10_000
    for s in range(0, n, step):
        shards.write_shard(dst, m, {k: v[s : s + step] for k, v in data.items()}, s, min(n, s + step))
    shards.finish(dst, m)
    return dst


def flip(labels: np.ndarray, probs: np.ndarray, classes: list[str], fraction: float, seed: int):
    """(noisy labels, flipped rows, which of them went to the most-confused class). Half the flips go to a random
    other class, half to the class the clean model confuses the row's class with most."""
    rng = np.random.default_rng(seed)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    counts = np.bincount(y, minlength=len(classes))
    eligible = counts >= MIN_CLASS_ITEMS
    scored = ~np.isnan(probs).any(axis=1)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (y[scored], probs[scored].argmax(axis=1)), 1.0)
    mean_prob = np.zeros((len(classes), len(classes)))
    np.add.at(mean_prob, y[scored], probs[scored])
    # most confused: the count of the clean model's mistakes, ties (and classes it never confuses) by mean probability
    affinity = confusion + 1e-3 * mean_prob / np.maximum(counts[:, None], 1)
    np.fill_diagonal(affinity, -np.inf)
    affinity[:, ~eligible] = -np.inf
    candidates = np.flatnonzero(eligible[y])
    k = int(round(fraction * len(labels)))
    rows = np.sort(rng.choice(candidates, size=k, replace=False))
    confused = np.zeros(k, bool)
    confused[rng.permutation(k)[: k // 2]] = True
    noisy = y.copy()
    others = np.flatnonzero(eligible)
    for r, to_confused in zip(rows, confused):
        if to_confused:
            noisy[r] = int(np.argmax(affinity[y[r]]))
        else:
            noisy[r] = rng.choice(others[others != y[r]])
    return np.array(classes, dtype=object)[noisy], rows, confused


def score(
    probs: np.ndarray, audited: np.ndarray, given: np.ndarray, classes, flipped, groups: dict, flagged, suspects
) -> dict:
    """The ranking's figures; `suspects` (rows the audit flags on the clean labels, before any flip) also gives the
    precision at k with those rows left out of the ranking, since a real mislabel there counts as a false positive."""
    from sklearn.metrics import average_precision_score

    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in given])
    p_given = np.nan_to_num(probs[np.arange(len(y)), y], nan=1.0)
    suspicion = np.where(audited, 1.0 - p_given, -1.0)  # rows the audit does not rank come last
    k = int(flipped.sum())
    top = np.zeros(len(y), bool)
    top[np.argsort(-suspicion, kind="stable")[:k]] = True
    hits = int((top & flipped).sum())
    out = {
        "k": k,
        "precision_at_k": round(hits / k, 4),
        "recall_at_k": round(hits / k, 4),  # k = the number flipped: both read the same
        "pr_auc": round(float(average_precision_score(flipped, suspicion)), 4),
        "flagged": int(flagged.sum()),
        "flagged_precision": round(float((flagged & flipped).sum() / max(flagged.sum(), 1)), 4),
        "flagged_recall": round(float((flagged & flipped).sum() / k), 4),
    }
    for name, mask in groups.items():
        out[f"recall_at_k_{name}"] = round(float((top & mask).sum() / max(mask.sum(), 1)), 4)
    # false positives among the top k that the clean-label audit already flagged: the catalog's own mislabels
    out["false_positives_at_k"] = int((top & ~flipped).sum())
    out["false_positives_at_k_clean_suspects"] = int((top & ~flipped & suspects).sum())
    kept = np.where(suspects & ~flipped, -2.0, suspicion)  # the clean suspects that were not flipped: ranked last
    top_kept = np.zeros(len(y), bool)
    top_kept[np.argsort(-kept, kind="stable")[:k]] = True
    out["precision_at_k_without_clean_suspects"] = round(float((top_kept & flipped).sum() / k), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}")
    ap.add_argument("--folds", type=int, default=AuditLabelsConfig.folds)
    ap.add_argument("--noise", type=float, default=0.05, help="share of rows whose label is flipped")
    ap.add_argument("--seed", type=int, default=0, help="which rows flip, and where to")
    ap.add_argument("--epochs", type=int, default=AuditLabelsConfig.epochs, help="trained models, per fold")
    ap.add_argument("--patience", type=int, default=AuditLabelsConfig.patience)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=None, help="working folder (default: a temporary folder)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise SystemExit(f"--models {args.models!r}: unknown {bad or 'empty list'}; choose from {','.join(MODELS)}")

    import logging

    prodfuse.keep_freed_heap_mapped()  # before TensorFlow starts its threads
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # repeatable fold runs, as the CLI has them
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the audit's per-fold lines
    from test_accuracy import fashion_shards

    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="label-audit-"))
    src = fashion_shards()
    meta = shards.read_shards(src, ["product_id", "split", LABEL, "sub_category"])
    keep = np.flatnonzero(np.isin(meta["split"].astype(str), ["train", "val"]))
    ids, truth = meta["product_id"][keep].astype(str), meta[LABEL][keep].astype(str)
    sub_of = pd.Series(meta["sub_category"][keep].astype(str)).groupby(truth).agg(lambda s: s.mode().iat[0]).to_dict()

    # the clean labels' out-of-fold linear probe: whose confusions the realistic flips follow
    clean = train_val_copy(src, out / "clean-shards", None, keep)
    cfg = dict(folds=args.folds, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size)
    clean_summary = prodfuse.audit_labels(
        AuditLabelsConfig(embeddings=str(clean), model="lr", out=str(out / "clean"), **cfg)
    )
    with np.load(out / "clean" / "pred_probs.npz") as f:
        clean_probs, classes = f["probs"], f["classes"].tolist()
    suspects = np.isin(ids, pd.read_csv(out / "clean" / "label_issues.csv", dtype={"id": str})["id"])
    noisy, rows, confused = flip(truth, clean_probs, classes, args.noise, args.seed)
    flipped = np.zeros(len(truth), bool)
    flipped[rows] = True
    kind = np.zeros(len(truth), object)
    kind[rows] = np.where(confused, "confused", "random")
    same_sub = flipped & np.array([sub_of[a] == sub_of[b] for a, b in zip(truth, noisy)])
    groups = {"confused": kind == "confused", "random": kind == "random", "same_sub_category": same_sub}
    emb = train_val_copy(src, out / "noisy-shards", noisy, keep)

    figures = {}
    runs = [m for m in models if m not in ("image", "text") or "default" not in models]
    for m in runs:
        t = time.perf_counter()
        prodfuse.audit_labels(AuditLabelsConfig(embeddings=str(emb), label_col=NOISY, model=m, out=str(out / m), **cfg))
        seconds = round(time.perf_counter() - t)
        flagged = np.isin(ids, pd.read_csv(out / m / "label_issues.csv", dtype={"id": str})["id"])
        with np.load(out / m / "pred_probs.npz") as f:
            assert f["ids"].tolist() == ids.tolist()
            audited, streams = f["audited"], {m: f["probs"]}
            if m == "default":  # the product fusion's single streams, trained alone in the same folds
                streams.update({x: f[f"probs_{x}"] for x in ("image", "text") if x in models})
        for name, probs in streams.items():
            # cleanlab's flags come with the audited model only; a stream's own are computed as audit_labels does
            flags = flagged if name == m else _flags(probs, audited, noisy, classes)
            figures[name] = {
                **score(probs, audited, noisy, classes, flipped, groups, flags, suspects),
                "out_of_fold_accuracy_on_noisy": round(_accuracy(probs, noisy, classes), 4),
                "seconds": seconds,
            }
        print(f"{m}: {json.dumps({n: figures[n] for n in streams})}", flush=True)

    print(
        json.dumps(
            {
                "benchmark": "label_audit",
                "data": f"fashion train+val, {LABEL}",
                "rows": int(len(truth)),
                "classes": len(classes),
                "folds": args.folds,
                "noise": args.noise,
                "seed": args.seed,
                "flipped": int(flipped.sum()),
                "flipped_confused": int(groups["confused"].sum()),
                "flipped_random": int(groups["random"].sum()),
                "flipped_same_sub_category": int(same_sub.sum()),
                "clean_lr_out_of_fold_accuracy": round(clean_summary["out_of_fold_accuracy"], 4),
                "clean_lr_flagged": clean_summary["issues"],
                "epochs": args.epochs if any(m != "lr" for m in models) else None,
                "cpu_count": os.cpu_count(),
                "seconds": round(time.perf_counter() - t0),
                "models": figures,
            }
        )
    )


def _accuracy(probs, labels, classes) -> float:
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    ok = ~np.isnan(probs).any(axis=1)
    return float((probs[ok].argmax(axis=1) == y[ok]).mean())


def _flags(probs, audited, labels, classes) -> np.ndarray:
    """cleanlab's flags (a row mask) on one stream's probabilities, as audit_labels computes them."""
    from cleanlab.filter import find_label_issues

    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    rows = np.flatnonzero(audited)
    present = np.unique(y[rows])
    remap = {int(c): i for i, c in enumerate(present)}
    sub = probs[np.ix_(rows, present)]
    sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1e-12)
    mask = np.zeros(len(y), bool)
    mask[rows[find_label_issues(np.array([remap[int(v)] for v in y[rows]]), sub, n_jobs=1)]] = True
    return mask


if __name__ == "__main__":
    main()
