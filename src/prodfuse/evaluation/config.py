"""EvaluateConfig and CompareConfig: the settings of `evaluate` and `compare`, their defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass

from prodfuse.checks import check_choice, check_range, comma_list
from prodfuse.modeling.config import FUSIONS, MONITORS, TrainConfig

SPLITS = ("test", "val", "all")
PROBES = ("lr_image", "lr_text", "lr_concat", "lr_late")  # the linear probes of probes.py
TRAINED = ("image", "text", "late") + FUSIONS
MODELS = TRAINED + PROBES
METRICS_ORDER = ("accuracy", "weighted_f1", "macro_f1")


@dataclass(frozen=True)
class EvaluateConfig:
    """Score a run folder on shards: `embeddings=None` means the run's own training shards, held-out rows;
    `split=None` the test split (val when the run has none) there, and every row of any other folder."""

    run: str
    embeddings: str | None = None
    split: str | None = None
    group_col: str | None = None
    out: str | None = None  # None: <run>/eval-<split>
    top_confusions: int = 20
    batch_size: int = 1024
    # Also score the items that have no near duplicate (image cosine >= duplicate_threshold) in these shards; the
    # run's own training shards mean its train rows.
    exclude_duplicates_of: str | None = None
    duplicate_threshold: float = 0.95

    def __post_init__(self):
        check_choice("split", self.split, SPLITS, optional=True)
        check_range("duplicate_threshold", self.duplicate_threshold, -1.0, 1.0)
        check_range("top_confusions", self.top_confusions, 0, 10_000, integer=True)
        check_range("batch_size", self.batch_size, 1, 1 << 20, integer=True)


def parse_models(value) -> tuple[str, ...]:
    names = list(comma_list(value))
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        raise ValueError(f"models {value!r}: unknown {bad or 'empty list'}; choose from {','.join(MODELS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class CompareConfig:
    """Unimodal, fused and linear-probe models on the same splits, repeated over `folds` or `seeds`."""

    embeddings: str
    val_embeddings: str | None = None
    test_embeddings: str | None = None
    folds: int | None = None
    seeds: int = 1
    label_col: str | None = None
    split_col: str | None = None
    epochs: int = 100
    patience: int = 20
    batch_size: int = 32
    weight_decay: float = TrainConfig.weight_decay
    monitor: str = TrainConfig.monitor
    seed: int = 42
    text_branch: str = "auto"  # auto: mlp when the shards hold text embeddings, else the token CNN
    late_objective: str = "logloss"
    models: tuple[str, ...] = MODELS
    out: str | None = None  # None: runs/compare-<embeddings name>
    overwrite: bool = False
    probe_cache: str | None = None  # a folder keeping the linear probes' results, keyed by their exact inputs

    def __post_init__(self):
        object.__setattr__(self, "models", parse_models(self.models))
        check_range("folds", self.folds, 3, 100, integer=True, optional=True)
        check_range("seeds", self.seeds, 1, 1000, integer=True)
        check_range("epochs", self.epochs, 1, 100_000, integer=True)
        check_range("patience", self.patience, 1, 100_000, integer=True)
        check_range("batch_size", self.batch_size, 1, 65536, integer=True)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_choice("monitor", self.monitor, MONITORS)
        check_choice("text_branch", self.text_branch, ("auto", "mlp", "cnn"))
        check_choice("late_objective", self.late_objective, ("logloss", "accuracy"))
        if self.folds and self.seeds > 1:
            raise ValueError(
                f"folds {self.folds} and seeds {self.seeds}: choose one way to repeat (folds vary the "
                f"data, seeds the split and the model's initialisation)"
            )
