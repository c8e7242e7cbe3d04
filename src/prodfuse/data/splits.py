"""Train / validation / test rows: from a split column, a seeded stratified split, or stratified K folds.

`train` makes the splits and `evaluate` recomputes them from the run's config, so both call `make_splits` with the
same arguments and get the same rows.
"""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def _sorted(out: dict) -> dict:
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _per_class(labels: np.ndarray, seed: int, deal) -> tuple[dict, list]:
    """Shuffle each class's rows by `seed` and let `deal(rows, rng)` return its (train, val, test) rows. Classes with
    fewer than 3 items cannot be split: they go to train, and are reported."""
    rng = np.random.default_rng(seed)
    out = {"train": [], "val": [], "test": []}
    too_small = []
    for c in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        if len(rows) < 3:
            out["train"] += rows.tolist()
            too_small.append((c, len(rows)))
            continue
        for name, part in zip(("train", "val", "test"), deal(rows, rng)):
            out[name] += part.tolist()
    return _sorted(out), too_small


def stratified_split(labels: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> tuple[dict, list]:
    """Per-class split by `fractions` (train, val, test); a test fraction of 0 gives no test rows (the test set is
    elsewhere). Classes with fewer than 3 items stay in train and are reported."""

    def deal(rows, rng):
        n_val = max(1, int(round(fractions[1] * len(rows))))
        n_test = max(1, int(round(fractions[2] * len(rows)))) if fractions[2] > 0 else 0
        return rows[n_val + n_test :], rows[:n_val], rows[n_val : n_val + n_test]

    return _per_class(labels, seed, deal)


def kfold_split(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[dict, list]:
    """Stratified K-fold: fold `fold` is the test split, fold `fold + 1` (mod K) the validation split, the rest
    train. Each class is shuffled by `seed` and dealt round-robin from a random fold, so fold sizes differ by at
    most one item per class. Classes with fewer than 3 items stay in train and are reported."""
    if isinstance(folds, bool) or int(folds) != folds or folds < 3:
        raise ValueError(
            f"folds must be an int >= 3 (one test, one validation, at least one training fold); got {folds!r}"
        )
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}; got {fold!r}")

    def deal(rows, rng):
        which = (rng.integers(folds) + np.arange(len(rows))) % folds
        val = (fold + 1) % folds
        return rows[(which != fold) & (which != val)], rows[which == val], rows[which == fold]

    return _per_class(labels, seed, deal)


def split_from_column(values: np.ndarray) -> dict:
    names = np.array([SPLIT_NAMES.get(str(v).strip().lower(), "?") for v in values])
    unknown = sorted({str(v) for v, n in zip(values, names) if n == "?"})
    if unknown:
        raise ValueError(
            f"split column has values {unknown[:5]} that are not train/val/test; fix them or pass "
            f"--split-col '' to split by seed instead."
        )
    return {k: np.flatnonzero(names == k) for k in ("train", "val", "test")}


def make_splits(
    labels: np.ndarray,
    split_values: np.ndarray | None,
    split_col: str | None,
    seed: int,
    *,
    folds: int | None = None,
    fold: int = 0,
    test_elsewhere: bool = False,
) -> tuple[dict, list, str]:
    """(rows per split, classes too small to split, a description) of one shard folder.

    Precedence: K folds when `folds` is set (of the rows the split column does not mark test, if there is one); else
    the split column if any; else a stratified split by seed, 80/10/10, or 90/10/0 when `test_elsewhere` (a separate
    test folder is scored instead).
    """
    if folds:
        how = f"stratified {folds}-fold by seed {seed}, fold {fold} test, fold {(fold + 1) % folds} val"
        if split_values is None:
            return (*kfold_split(labels, folds, fold, seed), how)
        # The folds are drawn from the split column's train and val rows: its test rows stay a held-out set that
        # cross-validation (and a search scored on it, `tune`) never sees.
        named = split_from_column(split_values)
        kept = np.sort(np.concatenate([named["train"], named["val"]]))
        splits, too_small = kfold_split(labels[kept], folds, fold, seed)
        return {k: kept[v] for k, v in splits.items()}, too_small, f"{how}, of the {split_col!r} train and val rows"
    if split_values is not None:
        return split_from_column(split_values), [], f"split column {split_col!r}"
    if test_elsewhere:
        splits, too_small = stratified_split(labels, seed, (0.9, 0.1, 0.0))
        return splits, too_small, f"stratified 90/10 train/val by seed {seed}"
    splits, too_small = stratified_split(labels, seed)
    return splits, too_small, f"stratified 80/10/10 by seed {seed}"


def plan_splits(
    labels: np.ndarray,
    split_values: np.ndarray | None,
    split_col: str | None,
    seed: int,
    *,
    folds: int | None = None,
    fold: int = 0,
    n_val_folder: int | None = None,
    n_test_folder: int | None = None,
) -> tuple[dict, list, str]:
    """Rows of each split as `{name: (where, rows)}`, `where` being "main" (the training shard folder), "val" (a
    separate validation folder) or "test" (a separate test folder); plus the classes too small to split and a
    description. A separate validation folder makes every main row a training row; a separate test folder leaves
    the main rows to train and validation (its own test rows, if a split column names some, are not used)."""
    empty = np.zeros(0, np.int64)
    test = ("test", np.arange(n_test_folder)) if n_test_folder is not None else ("main", empty)
    if n_val_folder is not None:
        source = "separate validation folder" + (" and test folder" if n_test_folder is not None else "")
        return (
            {"train": ("main", np.arange(len(labels))), "val": ("val", np.arange(n_val_folder)), "test": test},
            [],
            source,
        )
    splits, too_small, source = make_splits(
        labels, split_values, split_col, seed, folds=folds, fold=fold, test_elsewhere=n_test_folder is not None
    )
    if n_test_folder is not None:
        return (
            {"train": ("main", splits["train"]), "val": ("main", splits["val"]), "test": test},
            too_small,
            source + ", separate test folder",
        )
    return {k: ("main", v) for k, v in splits.items()}, too_small, source


def plan_labelled_splits(
    labels: dict,
    split_values: np.ndarray | None,
    split_col: str | None,
    seed: int,
    *,
    label_col: str,
    folders: dict | None = None,
    folds: int | None = None,
    fold: int = 0,
    skip_empty: bool = True,
) -> tuple[dict, list, str, int]:
    """`plan_splits` over the rows that have a label; `train` and `evaluate` both plan with it, so they get the same
    rows. `labels`: the label column of the main folder ("main") and of a separate "val" / "test" folder if any. A
    row whose label is empty (`shards.empty_cells`) is unlabelled, not a class: it is in no split. Returns (plan,
    classes too small to split, description, unlabelled rows of all the folders). A folder with rows but none
    labelled is a ValueError naming `label_col` (and the folder, from `folders`). `skip_empty` False plans over every
    row, as runs trained before unlabelled rows were left out did."""
    from prodfuse.data.shards import empty_cells

    kept = {}
    for where, values in labels.items():
        empty = empty_cells(values) if skip_empty else np.zeros(len(values), dtype=bool)
        if len(values) and empty.all():
            folder = (folders or {}).get(where)
            raise ValueError(
                f"every one of the {len(values)} rows{f' of {str(folder)!r}' if folder else ''} has an empty "
                f"{label_col!r} label (None, NaN or blank): unlabelled rows are left out, so there is nothing to "
                f"{'train on' if where == 'main' else 'validate on' if where == 'val' else 'test on'}. Fill "
                f"{label_col!r} in the catalog and extract again, or pass --label-col with a column that holds the "
                f"labels."
            )
        kept[where] = np.flatnonzero(~empty)
    main = kept["main"]
    plan, too_small, source = plan_splits(
        np.asarray(labels["main"])[main].astype(str),
        None if split_values is None else np.asarray(split_values)[main],
        split_col,
        seed,
        folds=folds,
        fold=fold,
        n_val_folder=len(kept["val"]) if "val" in kept else None,
        n_test_folder=len(kept["test"]) if "test" in kept else None,
    )
    unlabelled = sum(len(labels[where]) - len(rows) for where, rows in kept.items())
    return {name: (where, kept[where][rows]) for name, (where, rows) in plan.items()}, too_small, source, unlabelled
