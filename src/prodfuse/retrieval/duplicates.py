"""Near-duplicate listings: pairs whose photos (and optionally texts) are nearly the same, within one catalog or
between two (train vs test leakage), grouped into connected components.

Exact search in blocks of rows: n x m cosines cost about 6 s for 15,000 x 15,000 photos of 1,280-d on two cores,
and find every pair above the threshold (an approximate index would miss some).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from prodfuse.data import shards
from prodfuse.retrieval.config import AuditConfig

BLOCK_ROWS = 2048
# pairs.csv shows a title-length excerpt of each item's text (title, description and OCR joined): enough to
# recognise the product, where whole descriptions made the file unreadable in a spreadsheet.
EXCERPT_CHARS = 120


def excerpt(text, limit: int = EXCERPT_CHARS):
    """`text` cut to at most `limit` characters at a word boundary, with "…" when cut; non-strings unchanged."""
    if not isinstance(text, str) or len(text) <= limit:
        return text
    cut = text[: limit - 1]
    head = cut.rsplit(" ", 1)[0] if " " in cut[limit // 2 :] else cut
    return head.rstrip() + "…"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row stays zero (it matches nothing)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def near_duplicate_pairs(a: np.ndarray, b: np.ndarray | None = None, threshold: float = 0.95):
    """(i, j, cosine) of every pair with cosine >= threshold: rows of `a` against rows of `b`, or within `a`
    (then i < j). Inputs need not be normalised."""
    ua = unit_rows(a)
    ub = ua if b is None else unit_rows(b)
    if ua.shape[1:] != ub.shape[1:]:
        raise ValueError(f"vectors of {ua.shape[1]} and {ub.shape[1]} dimensions cannot be compared")
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(ua), BLOCK_ROWS):
        sims = ua[start : start + BLOCK_ROWS] @ ub.T
        if b is None:  # each pair once: only j > i
            sims[np.tril_indices(len(sims), k=start, m=len(ub))] = -np.inf
        i, j = np.nonzero(sims >= threshold)
        out_i.append(i + start)
        out_j.append(j)
        out_s.append(sims[i, j])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def best_match(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `a`, (the row of `b` most similar to it, that cosine)."""
    ua, ub = unit_rows(a), unit_rows(b)
    rows, sims = np.zeros(len(ua), np.int64), np.full(len(ua), -np.inf, np.float32)
    if len(ub) == 0:
        return rows, sims
    for start in range(0, len(ua), BLOCK_ROWS):
        s = ua[start : start + BLOCK_ROWS] @ ub.T
        rows[start : start + len(s)] = s.argmax(axis=1)
        sims[start : start + len(s)] = s.max(axis=1)
    return rows, sims


def duplicate_groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component id of each of n nodes joined by the edges (i, j)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _read(folder: Path, with_text: bool) -> tuple[dict, pd.DataFrame]:
    from prodfuse.retrieval.spaces import items_table

    manifest = shards.read_manifest(folder)
    present = shards.shard_columns(folder)
    cols = ["image_embedding"] + (["text_embedding"] if with_text else [])
    missing = [c for c in cols if c not in present]
    if missing:
        raise ValueError(f"shards {str(folder)!r} lack {missing}; the audit compares stored embeddings")
    return shards.read_shards(folder, cols), items_table(folder, manifest)


def audit(cfg: AuditConfig) -> dict:
    """Write pairs.csv, groups.csv and summary.json under cfg.out; returns the summary."""
    a_path = Path(cfg.embeddings)
    b_path = Path(cfg.against) if cfg.against else None
    with_text = cfg.text_threshold is not None
    a, a_items = _read(a_path, with_text)
    b, b_items = _read(b_path, with_text) if b_path else (None, None)
    if b is not None and a["image_embedding"].shape[1] != b["image_embedding"].shape[1]:
        raise ValueError(
            f"{a_path} holds {a['image_embedding'].shape[1]}-d image embeddings and {b_path} "
            f"{b['image_embedding'].shape[1]}-d: audit shards extracted with the same backbone"
        )
    i, j, sim = near_duplicate_pairs(a["image_embedding"], None if b is None else b["image_embedding"], cfg.threshold)
    pairs = pd.DataFrame({"image_cosine": np.round(sim.astype(np.float64), 5)})
    other_items = a_items if b is None else b_items
    if with_text:
        ta = unit_rows(a["text_embedding"])
        tb = ta if b is None else unit_rows(b["text_embedding"])
        tsim = np.einsum("ij,ij->i", ta[i], tb[j]) if len(i) else np.zeros(0, np.float32)
        keep = tsim >= cfg.text_threshold
        i, j, pairs = i[keep], j[keep], pairs[keep].reset_index(drop=True)
        pairs["text_cosine"] = np.round(tsim[keep].astype(np.float64), 5)
    left, right = a_items.iloc[i].reset_index(drop=True), other_items.iloc[j].reset_index(drop=True)
    for name, side in (("a", left), ("b", right)):
        for col in side.columns:
            values = side[col].to_numpy()
            pairs[f"{col}_{name}"] = [excerpt(v) for v in values] if col == "text" else values
    if "label" in a_items.columns and "label" in other_items.columns:
        pairs["same_label"] = pairs["label_a"].astype(str).to_numpy() == pairs["label_b"].astype(str).to_numpy()
    first = ["id_a", "id_b", "image_cosine"] + (["text_cosine"] if with_text else [])
    pairs = pairs[first + [c for c in pairs.columns if c not in first]]
    pairs = pairs.sort_values("image_cosine", ascending=False, kind="stable").reset_index(drop=True)

    # Groups over the union of both catalogs' rows (b's rows after a's), listing only rows in some pair.
    n_a = len(a_items)
    n = n_a + (0 if b is None else len(b_items))
    comp = duplicate_groups(n, i, j + (0 if b is None else n_a))
    members = np.unique(np.concatenate([i, j + (0 if b is None else n_a)])) if len(i) else np.zeros(0, np.int64)
    all_items = a_items if b is None else pd.concat([a_items.assign(catalog="a"), b_items.assign(catalog="b")])
    all_items = all_items.reset_index(drop=True)
    group_rows = []
    for g in np.unique(comp[members]) if len(members) else []:
        rows = members[comp[members] == g]
        entry = {"size": len(rows), "ids": " ".join(all_items["id"].iloc[rows].astype(str))}
        if "label" in all_items.columns:
            labels = sorted(set(all_items["label"].iloc[rows].astype(str)))
            entry["labels"] = " | ".join(labels)
            entry["mixed_labels"] = len(labels) > 1
        group_rows.append(entry)
    groups = pd.DataFrame(
        group_rows, columns=["size", "ids", "labels", "mixed_labels"][: 2 + 2 * ("label" in all_items)]
    )
    if len(groups):
        groups = groups.sort_values("size", ascending=False, kind="stable").reset_index(drop=True)
        groups.insert(0, "group", np.arange(1, len(groups) + 1))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs.to_csv(out / "pairs.csv", index=False)
    groups.to_csv(out / "groups.csv", index=False)
    summary = {
        "embeddings": str(a_path),
        "against": str(b_path) if b_path else None,
        "threshold": cfg.threshold,
        "text_threshold": cfg.text_threshold,
        "items": n_a,
        "against_items": None if b is None else len(b_items),
        "pairs": len(pairs),
        "groups": len(groups),
        "items_in_groups": int(len(members)),
        "pairs_with_different_labels": int((~pairs["same_label"]).sum()) if "same_label" in pairs else None,
    }
    if b is not None:
        summary["items_with_a_duplicate_in_against"] = int(len(np.unique(i)))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "out": str(out)}
