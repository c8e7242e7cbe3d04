"""What prediction writes and checks: the top-k prediction table, and whether shards fit a run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


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
):
    """One row per item: id, [true label], label_1, prob_1, ..., label_k, prob_k, image/text contribution."""
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
                    f"`python extract_embeddings.py --like {config['embeddings']}`."
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
