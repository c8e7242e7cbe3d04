"""How good a space is for retrieval: similar-item precision@k with the label as relevance, and the classical
cross-modal baseline (CCA) that the joint space is measured against."""

from __future__ import annotations

import numpy as np

from prodfuse.retrieval.duplicates import BLOCK_ROWS, unit_rows


def precision_at_k(
    query: np.ndarray, query_labels, base: np.ndarray, base_labels, k: int = 10, same_set: bool = False
) -> float:
    """Mean share of each query's k nearest base items (cosine) that carry the query's label. `same_set`: the
    queries are the base items themselves, and each query's own row is left out of its neighbours."""
    q, b = unit_rows(query), unit_rows(base)
    ql, bl = np.asarray(query_labels).astype(str), np.asarray(base_labels).astype(str)
    if len(q) == 0 or len(b) <= k:
        raise ValueError(f"precision@{k} needs queries and more than {k} base items; got {len(q)} and {len(b)}")
    hits = []
    for start in range(0, len(q), BLOCK_ROWS):
        sims = q[start : start + BLOCK_ROWS] @ b.T
        if same_set:
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hits.append((bl[top] == ql[start : start + len(sims), None]).mean(axis=1))
    return float(np.concatenate(hits).mean())


def cca_projections(
    train_image: np.ndarray, train_text: np.ndarray, pca: int = 64, components: int = 16, seed: int = 0
):
    """scikit-learn CCA fitted on paired training items, after PCA of each side (CCA's NIPALS is slow on 1,280-d
    inputs: PCA 64 and 16 components take about a minute on 12,000 fashion items). Returns (image -> space,
    text -> space) functions giving unit vectors."""
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA

    pi = PCA(min(pca, train_image.shape[1]), random_state=seed).fit(unit_rows(train_image))
    pt = PCA(min(pca, train_text.shape[1]), random_state=seed).fit(train_text)
    cca = CCA(n_components=components, max_iter=500, tol=1e-4)
    cca.fit(pi.transform(unit_rows(train_image)), pt.transform(train_text))

    def image(x):
        return unit_rows(cca.transform(pi.transform(unit_rows(x))))

    def text(x):
        # transform(X, Y) needs an X; the text side's projection does not depend on it
        dummy = np.zeros((len(x), pi.n_components_), np.float32)
        return unit_rows(cca.transform(dummy, pt.transform(x))[1])

    return image, text


def precision_by_space(
    base_folder, base_rows, query_folder, query_rows, run, label_col: str, k: int = 10, batch_size: int = 1024
) -> dict:
    """precision@k of the image, text and fused spaces (the fused space of `run`, a training run folder): the query
    rows against the base rows (None: every row). Items without text are left out of the text space's queries and
    base."""
    from prodfuse.data import shards
    from prodfuse.data.sequence import read_items, with_view
    from prodfuse.modeling.probabilities import model_outputs
    from prodfuse.modeling.run import Run
    from prodfuse.retrieval.spaces import fused_model

    r = run if isinstance(run, Run) else Run.load(run)
    embed = fused_model(r.model)

    def vectors(folder, rows):
        d = shards.read_shards(folder, ["image_embedding", "text_embedding", "has_text", label_col], rows)
        x = read_items(folder, r.inputs, rows=rows)
        return d, model_outputs(embed, with_view({i: x[i] for i in r.inputs}, 0), batch_size)

    (b, bf), (q, qf) = vectors(base_folder, base_rows), vectors(query_folder, query_rows)
    qt, bt = np.asarray(q["has_text"], bool), np.asarray(b["has_text"], bool)
    return {
        "image": precision_at_k(q["image_embedding"], q[label_col], b["image_embedding"], b[label_col], k),
        "text": precision_at_k(q["text_embedding"][qt], q[label_col][qt], b["text_embedding"][bt], b[label_col][bt], k),
        "fused": precision_at_k(qf, q[label_col], bf, b[label_col], k),
        "queries": int(len(qf)),
        "text_queries": int(qt.sum()),
    }
