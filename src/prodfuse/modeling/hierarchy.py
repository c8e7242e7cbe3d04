"""Category hierarchies: label columns coarse to fine (master_category -> sub_category -> article_type).

One model classifies the finest level, as without a hierarchy. A coarser node's probability is the sum of its
leaves' probabilities (the exact marginal of the model's distribution), so the predicted path, the path of the most
probable leaf, is a path of the tree by construction, the leaf accuracy is the flat model's, and probabilities never
increase along a path: a node holds at least its child's leaves. Backing off to the deepest node whose probability
reaches a minimum confidence therefore keeps a prefix of the path.

The tree is learned from the label columns of every labelled row (`learn_hierarchy`) and saved in the run folder
as hierarchy.json. Light: numpy only at import (scikit-learn for the per-level F1), no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HIERARCHY_FILE = "hierarchy.json"
# unique: a label with rows under two parents is an error; majority: it keeps its most frequent parent
LABEL_PARENTS = ("unique", "majority")
# the minimum confidences metrics.json reports back-off at
BACKOFF_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
_SHOWN = 5  # conflicts or rows named in an error; the rest are counted


@dataclass(frozen=True)
class Hierarchy:
    """A tree of labels: `levels` are the label columns coarse to fine, `parents[level]` maps each node of a level
    (every level but the first) to its node one level up. `conflicts` lists the nodes whose rows named several
    parents, resolved by `label_parents` "majority" (each with the row count per parent and the one kept)."""

    levels: tuple[str, ...]
    parents: dict[str, dict[str, str]]
    label_parents: str = "unique"
    conflicts: list[dict] = field(default_factory=list)

    @property
    def leaf_level(self) -> str:
        return self.levels[-1]

    def nodes(self, level: str) -> list[str]:
        """The nodes of a level, sorted."""
        if level == self.levels[0]:  # the root level is nobody's child: its nodes are the second level's parents
            return sorted(set(self.parents[self.levels[1]].values()))
        return sorted(self.parents[level])

    def path(self, leaf: str) -> tuple[str, ...]:
        """The nodes from the root level down to `leaf`, coarse to fine."""
        nodes = [leaf]
        for level in reversed(self.levels[1:]):
            nodes.append(self.parents[level][nodes[-1]])
        return tuple(reversed(nodes))

    def is_path(self, nodes) -> bool:
        """Whether `nodes` (one per level, coarse to fine) is a path of the tree."""
        nodes = list(nodes)
        if len(nodes) != len(self.levels):
            return False
        return all(self.parents[level].get(nodes[i + 1]) == nodes[i] for i, level in enumerate(self.levels[1:]))

    def to_dict(self) -> dict:
        return {
            "levels": list(self.levels),
            "parents": {level: dict(sorted(m.items())) for level, m in self.parents.items()},
            "label_parents": self.label_parents,
            "conflicts": self.conflicts,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Hierarchy":
        return cls(
            levels=tuple(d["levels"]),
            parents={level: dict(m) for level, m in d["parents"].items()},
            label_parents=d.get("label_parents", "unique"),
            conflicts=list(d.get("conflicts") or []),
        )


# ---------------------------------------------------------------------------------------------------- checks


def check_label_cols(label_cols, label_col: str | None = None) -> tuple[str, ...] | None:
    """The label columns coarse to fine as a tuple (a comma list from the command line, any sequence from Python);
    None for none. At least two, none repeated, and the finest is `label_col` when that is given."""
    from prodfuse.checks import comma_list

    if label_cols is None or label_cols == "":
        return None
    cols = comma_list(label_cols)
    if not all(isinstance(c, str) and c for c in cols):
        raise ValueError(f"label_cols must name columns, coarse to fine; got {label_cols!r}")
    if len(cols) < 2:
        raise ValueError(
            f"label_cols needs at least two columns, coarse to fine (e.g. 'master_category,article_type'); got "
            f"{list(cols)}. For a flat model give the one column as label_col instead."
        )
    repeated = sorted({c for c in cols if cols.count(c) > 1})
    if repeated:
        raise ValueError(f"label_cols names {repeated} more than once; got {list(cols)}. Give each level once.")
    if label_col is not None and label_col != cols[-1]:
        raise ValueError(
            f"label_col {label_col!r} is not the finest of label_cols {list(cols)}: the model learns the last one. "
            f"Drop label_col, or end label_cols with {label_col!r}."
        )
    return cols


def check_min_confidence(value) -> float | None:
    """None, or a number in (0, 1]: the probability a level of the path must reach to be answered."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= 1:
        raise ValueError(
            f"min_confidence must be a number in (0, 1], e.g. 0.9 (a level is answered when its probability is at "
            f"least that); got {value!r}"
        )
    return float(value)


# ---------------------------------------------------------------------------------------------------- learning


def _text(values) -> np.ndarray:
    """Labels as str, an empty cell (None, NaN, blank) as "" (imported here: this module stays numpy-only at
    import, for the command line's start)."""
    from prodfuse.data.shards import label_strings

    return label_strings(values)


def learn_hierarchy(columns: dict, levels, label_parents: str = "unique", ids=None) -> Hierarchy:
    """The tree of `levels` (column names, coarse to fine) from the rows of `columns` ({column: values}) whose finest
    label is not empty (the others are unlabelled: training leaves them out of every split). Each node must have one
    parent over those rows (else a ValueError naming the node, its parents and the level; with `label_parents`
    "majority" it keeps its most frequent one and the conflict is recorded), and no coarser level may be empty on
    such a row (a ValueError naming rows by `ids` when given)."""
    from prodfuse.checks import check_choice

    check_choice("label_parents", label_parents, LABEL_PARENTS)
    levels = tuple(levels)
    values = {c: _text(columns[c]) for c in levels}
    labelled = values[levels[-1]] != ""
    if not labelled.any():
        raise ValueError(f"no row has a {levels[-1]!r} label: the hierarchy {list(levels)} cannot be learned")
    for level in levels[:-1]:
        empty = labelled & (values[level] == "")
        if empty.any():
            rows = np.flatnonzero(empty)[:_SHOWN]
            named = [str(ids[i]) for i in rows] if ids is not None else [int(i) for i in rows]
            fine = sorted(set(values[levels[-1]][empty].tolist()))[:_SHOWN]
            raise ValueError(
                f"{int(empty.sum())} rows with a {levels[-1]!r} label have no {level!r} (empty), e.g. "
                f"{'ids' if ids is not None else 'rows'} {named} (labels {fine}): every labelled row needs each level. "
                f"Fill {level!r} in the catalog and extract again, or leave {level!r} out of label_cols."
            )
    parents, conflicts = {}, []
    for upper, level in zip(levels[:-1], levels[1:]):
        pairs = Counter(zip(values[level][labelled].tolist(), values[upper][labelled].tolist()))
        seen: dict[str, Counter] = {}
        for (node, parent), n in pairs.items():
            seen.setdefault(node, Counter())[parent] = n
        parents[level] = {}
        for node in sorted(seen):
            counts = seen[node]
            # most rows first, then by name: the same tree from the same rows in any order
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            parents[level][node] = ranked[0][0]
            if len(ranked) > 1:
                conflicts.append({"level": level, "label": node, "parents": dict(ranked), "kept": ranked[0][0]})
    if conflicts and label_parents == "unique":
        # the finest level's first: usually a fine label filed under a stray parent
        ordered = sorted(conflicts, key=lambda c: -levels.index(c["level"]))
        first, more = ordered[0], ordered[1:]
        shown = ", ".join(f"{p!r} ({n} rows)" for p, n in first["parents"].items())
        also = (
            f" {len(more)} more labels have several parents: "
            + ", ".join(f"{c['level']} {c['label']!r}" for c in more[:_SHOWN])
            + (", ..." if len(more) > _SHOWN else "")
            + "."
            if more
            else ""
        )
        upper = levels[levels.index(first["level"]) - 1]
        raise ValueError(
            f"{first['level']} {first['label']!r} has {len(first['parents'])} parents at level {upper!r}: {shown}: "
            f"a label must have one parent for the levels to form a tree.{also} Fix those rows of the catalog, or "
            f"pass label_parents 'majority' (--label-parents majority) to keep each label's most frequent parent."
        )
    return Hierarchy(levels=levels, parents=parents, label_parents=label_parents, conflicts=conflicts)


def carried_columns(columns) -> list[str]:
    """The catalog columns among a shard folder's columns (not the embeddings and text extraction adds)."""
    from prodfuse.data.shards import NON_NULL_COLUMNS

    return [c for c in columns if c not in NON_NULL_COLUMNS and c not in ("text", "ocr_text")]


def read_level_columns(folders, levels) -> dict[str, np.ndarray]:
    """{column: labels as str} of every row of the shard folders, one after the other (the order in which training
    concatenates them); a column a folder lacks is a ValueError listing the columns it carries."""
    from prodfuse.data import shards

    parts = []
    for folder in folders:
        present = shards.shard_columns(folder)
        missing = [c for c in levels if c not in present]
        if present and missing:
            raise ValueError(
                f"label_cols {missing} are not columns of the shards in {str(folder)!r}; they carry "
                f"{carried_columns(present)}. Extraction keeps every catalog column that is not a text column: "
                f"pass --label-cols with those, or add the column to the catalog and extract again."
            )
        if present:
            data = shards.read_shards(folder, list(levels))
            parts.append({c: _text(data[c]) for c in levels})
    return {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, object) for c in levels}


def hierarchy_from_shards(folders, levels, label_parents: str = "unique") -> tuple[Hierarchy, dict[str, np.ndarray]]:
    """(the tree learned from every labelled row of the shard folders, the level columns of every row, folders one
    after the other). `folders`: None entries are skipped."""
    from prodfuse.data import shards

    folders = [f for f in folders if f]
    values = read_level_columns(folders, levels)
    ids = []
    for folder in folders:
        id_col = shards.read_manifest(folder)["columns"].get("id")
        if id_col and id_col in shards.shard_columns(folder):
            ids.append(_text(shards.read_shards(folder, [id_col])[id_col]))
    ids = np.concatenate(ids) if len(ids) == len(folders) and ids else None
    return learn_hierarchy(values, levels, label_parents, ids=ids), values


def save_hierarchy(run: str | os.PathLike, hierarchy: Hierarchy) -> Path:
    path = Path(run) / HIERARCHY_FILE
    path.write_text(json.dumps(hierarchy.to_dict(), indent=1))
    return path


def load_hierarchy(run: str | os.PathLike) -> Hierarchy | None:
    """The run folder's hierarchy, or None when it was trained without one."""
    path = Path(run) / HIERARCHY_FILE
    return Hierarchy.from_dict(json.loads(path.read_text())) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------- probabilities


def level_probabilities(hierarchy: Hierarchy, probs: np.ndarray, classes) -> dict[str, dict]:
    """Per level, coarse to fine: {"nodes": its nodes that hold at least one class, "probs": [n, nodes] the sums of
    their leaves' probabilities, "of_class": [classes] each class's node index}. The finest level is `probs` itself.

    Summed level by level from the leaves up: in floating point a parent is then never below any of its children
    (a sum of non-negative numbers is at least each of them), so a path's probabilities never increase."""
    classes = [str(c) for c in classes]
    unknown = [c for c in classes if c not in hierarchy.parents[hierarchy.leaf_level]]
    if unknown:
        raise ValueError(f"classes {unknown[:_SHOWN]} are not leaves of the hierarchy {list(hierarchy.levels)}")
    probs = np.asarray(probs)
    out = {hierarchy.leaf_level: {"nodes": classes, "probs": probs, "of_class": np.arange(len(classes))}}
    nodes, p, of_class = classes, probs, np.arange(len(classes))
    for upper, level in reversed(list(zip(hierarchy.levels[:-1], hierarchy.levels[1:]))):
        parent_of = [hierarchy.parents[level][x] for x in nodes]
        up_nodes = sorted(set(parent_of))
        index = {x: i for i, x in enumerate(up_nodes)}
        up_of_node = np.array([index[x] for x in parent_of], dtype=np.int64)
        order = np.argsort(up_of_node, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(up_of_node[order]) != 0])
        p = np.add.reduceat(p[:, order], starts, axis=1) if len(p) else np.zeros((0, len(up_nodes)), p.dtype)
        nodes, of_class = up_nodes, up_of_node[of_class]
        out[upper] = {"nodes": nodes, "probs": p, "of_class": of_class}
    return {level: out[level] for level in hierarchy.levels}


def best_paths(hierarchy: Hierarchy, probs: np.ndarray, classes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{level: (labels [n], probabilities [n])}, coarse to fine: each item's path to its most probable leaf (ties:
    the lower class index, as argmax) with each node's probability."""
    levels = level_probabilities(hierarchy, probs, classes)
    leaf = np.asarray(probs).argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    rows = np.arange(len(leaf))
    out = {}
    for level, lv in levels.items():
        node = lv["of_class"][leaf]
        out[level] = (np.asarray(lv["nodes"], dtype=object)[node], lv["probs"][rows, node].astype(np.float64))
    return out


def answered_depth(paths: dict, min_confidence: float | None) -> np.ndarray:
    """[n] how many levels of each path are answered: the levels down to the deepest whose probability is at least
    `min_confidence` (all of them for None). A prefix even if rounding broke the order: the first level below it
    ends the path."""
    probs = np.stack([p for _, p in paths.values()], axis=1) if paths else np.zeros((0, 0))
    if min_confidence is None:
        return np.full(len(probs), probs.shape[1], np.int64)
    return np.cumprod(probs >= min_confidence, axis=1).sum(axis=1).astype(np.int64)


def path_records(paths: dict, min_confidence: float | None = None) -> list[list[dict]]:
    """Per item, its path as [{"level", "label", "probability"}] coarse to fine, cut after the deepest level whose
    probability is at least `min_confidence` (empty when even the coarsest is below it)."""
    depth = answered_depth(paths, min_confidence)
    levels = list(paths)
    return [
        [
            {"level": level, "label": str(paths[level][0][i]), "probability": float(paths[level][1][i])}
            for level in levels[: depth[i]]
        ]
        for i in range(len(depth))
    ]


def back_off(path: list[dict], min_confidence: float | None) -> list[dict]:
    """A path (as `path_records` gives it) cut after its deepest level whose probability is at least
    `min_confidence`: the parent answers when the leaf is below it, and so on up."""
    min_confidence = check_min_confidence(min_confidence)
    if not path:
        return []
    # the one cut rule, as path_records applies it to whole arrays
    depth = answered_depth({s["level"]: (None, np.array([s["probability"]])) for s in path}, min_confidence)[0]
    return list(path[:depth])


# ---------------------------------------------------------------------------------------------------- metrics


def hierarchy_metrics(
    hierarchy: Hierarchy, probs: np.ndarray, classes, y: np.ndarray, truth: dict, thresholds=BACKOFF_THRESHOLDS
) -> dict:
    """Per-level and back-off figures of items with true class indices `y` and true coarser labels `truth`
    ({column: labels}, each item's own row; the leaf truth is `classes[y]`):

    - "levels": {column: {"accuracy", "weighted_f1"}} of the predicted path's node at that level;
    - "consistent_paths": the share of items whose predicted path is a path of the tree (checked, not assumed);
    - "backoff": {str(min confidence): {"leaf", "answered", "accuracy"}}: the share answered at the finest level,
      the share answered at any level, and the accuracy of the answers (None when none is), an answer being the
      deepest node of the path whose probability reaches the minimum (right when it is the item's own label there).
    """
    from sklearn.metrics import f1_score

    y = np.asarray(y, dtype=np.int64)
    names = np.asarray([str(c) for c in classes], dtype=object)
    true = {level: _text(truth[level]) for level in hierarchy.levels[:-1]}
    true[hierarchy.leaf_level] = names[y]
    paths = best_paths(hierarchy, probs, classes)
    n = len(y)
    nan = float("nan")
    levels = {}
    for level, (pred, _) in paths.items():
        hits = pred == true[level]
        levels[level] = {
            "accuracy": float(hits.mean()) if n else nan,
            "weighted_f1": float(
                f1_score(true[level].astype(str), pred.astype(str), average="weighted", zero_division=0)
            )
            if n
            else nan,
        }
    predicted = list(zip(*(pred.tolist() for pred, _ in paths.values()))) if n else []
    valid = {p: hierarchy.is_path(p) for p in set(predicted)}
    consistent = float(np.mean([valid[p] for p in predicted])) if n else nan
    hits = np.stack([paths[level][0] == true[level] for level in hierarchy.levels], axis=1) if n else None
    backoff = {}
    for t in thresholds:
        depth = answered_depth(paths, t)
        answered = depth > 0
        right = hits[np.arange(n), np.maximum(depth, 1) - 1] & answered if n else np.zeros(0, bool)
        backoff[str(t)] = {
            "leaf": float(np.mean(depth == len(hierarchy.levels))) if n else nan,
            "answered": float(answered.mean()) if n else nan,
            "accuracy": float(right[answered].mean()) if answered.any() else None,  # nothing answered: no figure
        }
    return {"levels": levels, "consistent_paths": consistent, "backoff": backoff}
