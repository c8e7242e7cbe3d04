"""EvaluateConfig, CompareConfig, TuneConfig and AuditLabelsConfig: the settings of `evaluate`, `compare`, `tune` and
`audit --labels`, their defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass

from prodfuse.checks import blank_to_none, check_choice, check_range, comma_list
from prodfuse.modeling.config import FUSIONS, INPUT_NORMS, LATE_FUSIONS, LR_SCHEDULES, MONITORS, TrainConfig

SPLITS = ("test", "val", "all")
PROBES = ("lr_image", "lr_text", "lr_concat", "lr_late")  # the linear probes of probes.py
# "product_no_probe": the product fusion of the two streams alone (train --no-probe-expert), the default before the
# linear probe joined it as a third expert
TRAINED = ("image", "text", "late") + FUSIONS + ("product_no_probe",)
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


# What `tune` may search: TrainConfig settings and their ranges, ("float", low, high, log) or ("categorical", choices).
# Every range holds TrainConfig's default, which trial 0 scores.
TUNE_SPACE = {
    "lr": ("float", 1e-4, 3e-3, True),
    "weight_decay": ("float", 1e-3, 0.3, True),
    "batch_size": ("categorical", (16, 32, 64, 128)),
    "label_smoothing": ("float", 0.0, 0.2, False),
    "input_norm": ("categorical", INPUT_NORMS),
    "wide": ("categorical", (True, False)),
    "lr_schedule": ("categorical", LR_SCHEDULES),
    "modality_dropout": ("float", 0.0, 0.7, False),  # jointly trained fusions only: product trains each stream alone
}


def tune_space(names, fusion: str) -> dict:
    """The searched settings: `names` (None: every one that applies to `fusion`), with their ranges."""
    if names is None:
        return {k: v for k, v in TUNE_SPACE.items() if k != "modality_dropout" or fusion not in LATE_FUSIONS}
    names = list(comma_list(names))
    bad = [n for n in names if n not in TUNE_SPACE]
    if bad or not names:
        raise ValueError(f"space {names!r}: unknown {bad or 'empty list'}; choose from {','.join(TUNE_SPACE)}")
    return {k: TUNE_SPACE[k] for k in names}


@dataclass(frozen=True)
class TuneConfig:
    """Search the head's settings by K-fold cross-validation on `embeddings` within a time budget (`tune.py`).

    Rows the shards' split column marks test are left out of the folds; a folder without a split column is folded
    whole, so a held-out test set must stay out of it.
    A trial started before the budget runs out is finished; `max_trials` caps the count as well."""

    embeddings: str
    folds: int = 3
    fusion: str = TrainConfig.fusion
    budget_minutes: float = 60.0
    max_trials: int | None = None
    space: tuple[str, ...] | None = None  # None: every setting of TUNE_SPACE that applies to the fusion
    label_col: str | None = None
    split_col: str | None = None
    epochs: int = TrainConfig.epochs
    patience: int = TrainConfig.patience
    seed: int = 42
    out: str | None = None  # None: runs/tune-<embeddings name>
    overwrite: bool = False

    def __post_init__(self):
        check_choice("fusion", self.fusion, FUSIONS)
        check_range("folds", self.folds, 3, 100, integer=True)
        check_range("budget_minutes", self.budget_minutes, 0.01, 60.0 * 24 * 30)
        check_range("max_trials", self.max_trials, 1, 100_000, integer=True, optional=True)
        check_range("epochs", self.epochs, 1, 100_000, integer=True)
        check_range("patience", self.patience, 1, 100_000, integer=True)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        if self.space is not None:
            object.__setattr__(self, "space", tuple(tune_space(self.space, self.fusion)))


# `audit --labels`: the model whose out-of-fold probabilities rank the labels. default: train's default model (its
# fusion, each fold a `train` run); lr: the linear probe on [L2(image); text], fast; image / text: the default
# model's single streams, each trained alone (the benchmark's comparison).
LABEL_AUDIT_MODELS = ("default", "lr", "image", "text")


@dataclass(frozen=True)
class AuditLabelsConfig:
    """Likely mislabelled rows of a labelled shard folder (`label_audit.py`): out-of-fold probabilities over
    stratified `folds` of every labelled row, each row scored by a model that never trained on it, then cleanlab's
    confident learning. `label_col=None` takes the label column recorded at extraction. Classes with fewer than
    `folds` items are left out of the ranking (listed in the summary); rows with an empty label are in no fold (not
    audited, counted). Writes label_issues.csv, label_issues_summary.csv,
    label_issues.html (the `top` suspects with thumbnails), label_audit.json and pred_probs.npz under `out`."""

    embeddings: str
    label_col: str | None = None
    folds: int = 5
    model: str = "default"
    top: int = 50
    out: str = "audit"
    # the default model's training, as `train` has it; fewer epochs make a quicker, rougher audit
    epochs: int = TrainConfig.epochs
    patience: int = TrainConfig.patience
    batch_size: int = TrainConfig.batch_size
    seed: int = 42
    verbose: int = 0  # Keras fit verbosity of the fold runs: 0 silent, 2 one line per epoch

    def __post_init__(self):
        blank_to_none(self, "label_col")
        check_choice("model", self.model, LABEL_AUDIT_MODELS)
        # fold k is scored, k+1 validates the default model's early stopping, the rest train it
        check_range("folds", self.folds, 3, 100, integer=True)
        check_range("top", self.top, 0, 100_000, integer=True)
        check_range("epochs", self.epochs, 1, 100_000, integer=True)
        check_range("patience", self.patience, 1, 100_000, integer=True)
        check_range("batch_size", self.batch_size, 1, 65536, integer=True)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        check_choice("verbose", self.verbose, (0, 1, 2))
        if not self.out:
            raise ValueError(f"out must name a folder for the audit's files; got {self.out!r}")
