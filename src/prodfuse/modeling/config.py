"""TrainConfig: every setting of a training run, its default and its check, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from prodfuse.checks import blank_to_none, check_choice, check_range, comma_list

# "product": each stream trained alone, their probabilities multiplied with weights fitted on validation;
# "stack": the same two models, a logistic regression on their out-of-fold log-probabilities; "joint": the same two
# models frozen, a small head trained on their penultimate vectors and logits (prodfuse.modeling.stacking)
FUSIONS = ("concat", "gated", "cross_attention", "product", "stack", "joint")
LATE_FUSIONS = ("product", "stack", "joint")  # each stream trained alone first
TEXT_BRANCHES = ("mlp", "cnn", "none")
IMAGE_BRANCHES = ("mlp", "none")
INPUT_NORMS = ("l2", "none")
LR_SCHEDULES = ("plateau", "cosine")
CLASS_WEIGHTS = ("balanced", "none")
PRECISIONS = ("float32", "mixed_float16")
STRATEGIES = ("default", "mirrored")  # default: one device; mirrored: tf.distribute.MirroredStrategy
MONITOR_MODES = {"val_accuracy": "max", "val_loss": "min"}  # what early stopping follows, and which way is better
MONITORS = tuple(MONITOR_MODES)


def batch_split_message(batch_size: int, replicas: int) -> str:
    """The error for a global batch that the replicas cannot share evenly."""
    lower, upper = batch_size // replicas * replicas, -(-batch_size // replicas) * replicas
    fix = f"{lower} or {upper}" if lower else f"{upper}"
    return (
        f"batch_size {batch_size} cannot be split evenly over {replicas} replicas (the global batch is divided "
        f"between them); use a multiple of {replicas}, e.g. {fix}"
    )


@dataclass(frozen=True)
class TrainConfig:
    """One training run: which shards, which model, how it is fitted, where the run folder goes.

    `label_col=None` takes the label column recorded in the shards' manifest at extraction; `split_col=None` the
    split column recorded there. `out=None` writes runs/<embeddings name>-<fusion> (-2, -3, ... when taken). An
    existing `out` is refused unless `overwrite`, which clears it first: a run folder never mixes two runs.
    """

    embeddings: str | None = None  # None: the demo's embeddings/demo
    val_embeddings: str | None = None
    test_embeddings: str | None = None
    folds: int | None = None
    fold: int = 0
    label_col: str | None = None
    # A category hierarchy, label columns coarse to fine ("master_category,sub_category,article_type"): the model
    # learns the last one (label_col), the coarser levels are sums of its leaves' probabilities (modeling/hierarchy.py)
    label_cols: tuple[str, ...] | None = None
    label_parents: str = "unique"  # "majority": a label seen under several parents keeps its most frequent one
    split_col: str | None = None
    # each stream trained alone, their probabilities multiplied with weights fitted on validation: at least the
    # better stream on grocery and fashion, where a jointly trained fusion lost to it (docs/reports/model-quality.md)
    fusion: str = "product"
    # fusion "product": a third expert, the linear probe on both embeddings (logistic regression, as compare's
    # lr_concat), its weight fitted on validation with the two streams'. None: on wherever it applies (product of
    # an image and a text embedding): it read at least the two-expert product on every seed of fashion, fashion with
    # catalog columns and grocery, above it on 7 of 9 (docs/reports/model-quality.md)
    probe_expert: bool | None = None
    stack_folds: int = 3  # fusion "stack": folds of the training rows for the out-of-fold probabilities
    text_branch: str = "mlp"
    image_branch: str = "mlp"
    wide: bool = True  # a linear path from the embeddings to the logits beside the MLP
    input_norm: str = "l2"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "plateau"
    # Decoupled weight decay (AdamW) with early stopping on the validation loss: +1.5 points on grocery, fashion
    # unchanged within its noise (docs/reports/model-quality.md); either alone does nothing.
    weight_decay: float = 0.05
    monitor: str = "val_loss"  # what early stopping and the best checkpoint follow
    class_weight: str = "none"
    label_smoothing: float = 0.1
    mixup: float = 0.0
    modality_dropout: float = 0.5
    patience: int = 20
    ensemble: int = 1
    staged: bool = False
    precision: str = "float32"
    # "mirrored": one model replica per device (tf.distribute.MirroredStrategy), gradients summed across replicas
    # every step. `batch_size` stays the global batch: each replica gets batch_size / replicas of it, so the same
    # lr fits (docs/commands/train.md). `devices` None: every visible GPU (the CPU when there is none), else these names.
    strategy: str = "default"
    devices: tuple[str, ...] | None = None
    seed: int = 42
    out: str | None = None
    overwrite: bool = False
    verbose: int = 2  # Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch

    def __post_init__(self):
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("text_branch", self.text_branch, TEXT_BRANCHES)
        check_choice("image_branch", self.image_branch, IMAGE_BRANCHES)
        check_choice("input_norm", self.input_norm, INPUT_NORMS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("monitor", self.monitor, MONITORS)
        check_choice("verbose", self.verbose, (0, 1, 2))
        check_range("epochs", self.epochs, 1, 100_000, integer=True)
        check_range("batch_size", self.batch_size, 1, 65536, integer=True)
        check_range("lr", self.lr, 1e-7, 10.0)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.99)
        check_range("mixup", self.mixup, 0.0, 10.0)
        check_range("modality_dropout", self.modality_dropout, 0.0, 1.0)
        check_range("patience", self.patience, 1, 100_000, integer=True)
        check_range("ensemble", self.ensemble, 1, 64, integer=True)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        check_range("stack_folds", self.stack_folds, 2, 20, integer=True)
        check_range("folds", self.folds, 3, 100, integer=True, optional=True)
        if self.folds is not None:
            check_range("fold", self.fold, 0, self.folds - 1, integer=True)
        if self.image_branch == "none" and self.text_branch == "none":
            raise ValueError("image_branch and text_branch are both 'none': the model would have no input")
        if self.staged and self.fusion in LATE_FUSIONS:
            raise ValueError(
                f"staged training fine-tunes a joint fusion layer; fusion {self.fusion!r} trains each stream alone "
                f"and has none: choose concat, gated or cross_attention, or leave staged off"
            )
        if self.probe_expert and not self._probe_applies:
            raise ValueError(
                f"probe_expert joins the product fusion of an image and a text embedding; got fusion {self.fusion!r}, "
                f"image_branch {self.image_branch!r}, text_branch {self.text_branch!r}: use fusion product with both "
                f"branches mlp, or leave probe_expert off"
            )
        if self.ensemble > 1 and self.staged:
            raise ValueError(f"ensemble {self.ensemble} cannot be combined with staged training; choose one")
        blank_to_none(self, "label_col")
        self._check_label_cols()
        if self.devices is not None:
            self._check_devices()

    def _check_label_cols(self) -> None:
        from prodfuse.modeling.hierarchy import LABEL_PARENTS, check_label_cols

        check_choice("label_parents", self.label_parents, LABEL_PARENTS)
        cols = check_label_cols(self.label_cols, self.label_col)
        object.__setattr__(self, "label_cols", cols)
        if cols is None and self.label_parents != "unique":
            raise ValueError(
                f"label_parents {self.label_parents!r} applies to a hierarchy; give label_cols too (--label-cols)"
            )
        if cols is not None:
            object.__setattr__(self, "label_col", cols[-1])  # the model learns the finest level

    def _check_devices(self) -> None:
        given = self.devices
        devices = comma_list(given)  # "/gpu:0,/gpu:1" from the command line, a list from config.json
        object.__setattr__(self, "devices", devices)
        if self.strategy != "mirrored":
            raise ValueError(
                f"devices {list(devices)} only apply to strategy 'mirrored'; got strategy {self.strategy!r}"
            )
        if not devices or not all(isinstance(d, str) and d for d in devices):
            raise ValueError(f"devices must name at least one device, e.g. '/gpu:0,/gpu:1'; got {given!r}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices must not repeat a device; got {list(devices)}")
        if self.batch_size % len(devices):
            raise ValueError(batch_split_message(self.batch_size, len(devices)))

    @property
    def _probe_applies(self) -> bool:
        return self.fusion == "product" and self.image_branch == "mlp" and self.text_branch == "mlp"

    @property
    def uses_probe_expert(self) -> bool:
        """Whether the product fusion gets the linear probe as a third expert (probe_expert None: where it applies)."""
        return self._probe_applies if self.probe_expert is None else bool(self.probe_expert)

    @property
    def both_streams(self) -> bool:
        return self.image_branch != "none" and self.text_branch != "none"
