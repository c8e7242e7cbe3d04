"""The settings of `align`, `index`, `search` and `audit`: defaults and checks in one place."""

from __future__ import annotations

from dataclasses import dataclass

from prodfuse.checks import blank_to_none, check_choice, check_range

SPACES = ("image", "text", "fused", "joint")
# As retrieval.index (which imports faiss; this module must not).
INDEX_TYPES = ("auto", "flat", "ivfflat", "hnsw", "ivfpq")


@dataclass(frozen=True)
class AlignConfig:
    """Two projection towers (image embedding -> dim, text embedding -> dim, unit length) trained with a symmetric
    InfoNCE loss and a learnable temperature, so that a product's photo and its text lie close (the `joint` space).

    Rows come from the shards' split column when they have one (train / val; test is never used), else a seeded
    `val_fraction` of the rows; `val_embeddings` gives validation rows from another folder instead.
    """

    embeddings: str
    out: str
    val_embeddings: str | None = None
    split_col: str | None = None  # None: the one recorded at extraction
    dim: int = 256
    hidden: int = 512
    dropout: float = 0.1
    epochs: int = 60
    batch_size: int = 256  # larger batches give InfoNCE more negatives per item
    lr: float = 1e-3
    temperature: float = 0.07  # initial; learned (kept in [0.01, 1])
    patience: int = 5
    val_fraction: float = 0.1
    seed: int = 42
    overwrite: bool = False
    verbose: int = 2

    def __post_init__(self):
        blank_to_none(self, "val_embeddings", "split_col")
        check_range("dim", self.dim, 2, 4096, integer=True)
        check_range("hidden", self.hidden, 0, 16384, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.9)
        check_range("epochs", self.epochs, 1, 100_000, integer=True)
        check_range("batch_size", self.batch_size, 8, 65536, integer=True)
        check_range("lr", self.lr, 1e-7, 1.0)
        check_range("temperature", self.temperature, 0.01, 1.0)
        check_range("patience", self.patience, 1, 100_000, integer=True)
        check_range("val_fraction", self.val_fraction, 0.01, 0.5)
        check_range("seed", self.seed, 0, 2**31 - 1, integer=True)
        check_range("verbose", self.verbose, 0, 2, integer=True)


@dataclass(frozen=True)
class IndexConfig:
    """Index the items of a shard folder in one space. `run`: a training run folder (space `fused`) or an align run
    folder (space `joint`). `add`: shard folders appended to the existing index at `out` without a rebuild."""

    embeddings: str | None
    out: str
    space: str = "image"
    run: str | None = None
    index_type: str = "auto"
    add: tuple[str, ...] = ()
    batch_size: int = 1024

    def __post_init__(self):
        blank_to_none(self, "run", "embeddings")
        object.__setattr__(self, "add", tuple(self.add or ()))
        check_choice("space", self.space, SPACES)
        check_choice("index_type", self.index_type, INDEX_TYPES)
        check_range("batch_size", self.batch_size, 1, 1 << 20, integer=True)
        if self.space in ("fused", "joint") and not self.run:
            what = (
                "a training run folder (prodfuse train)" if self.space == "fused" else "an align run (prodfuse align)"
            )
            raise ValueError(f"space {self.space!r} needs run: {what}")
        if self.space in ("image", "text") and self.run:
            raise ValueError(
                f"space {self.space!r} takes the stored embeddings as they are; run {self.run!r} is not used"
            )
        if not self.embeddings and not self.add:
            raise ValueError("embeddings is missing: give the shard folder to index (or add: folders to append)")


@dataclass(frozen=True)
class SearchConfig:
    """One query against an index: an indexed item's id, a new photo, or words."""

    index: str
    id: str | None = None
    image: str | None = None
    text: str | None = None
    k: int = 10
    out: str | None = None  # a CSV of the results
    ocr_workers: int = 1
    trust_pickle: bool = False  # load a pre-0.2 pickled TF-IDF state of the index's shards (runs code)

    def __post_init__(self):
        blank_to_none(self, "id", "image", "text", "out")
        given = [n for n in ("id", "image", "text") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of id, image, text as the query; got {given or 'none'}")
        check_range("k", self.k, 1, 10_000, integer=True)
        check_range("ocr_workers", self.ocr_workers, 1, 256, integer=True)


@dataclass(frozen=True)
class AuditConfig:
    """Near-duplicate pairs within a shard folder, or between it and `against` (e.g. test vs train): image cosine
    >= `threshold`, and text cosine >= `text_threshold` when that is set."""

    embeddings: str
    out: str
    against: str | None = None
    threshold: float = 0.95
    text_threshold: float | None = None

    def __post_init__(self):
        blank_to_none(self, "against")
        check_range("threshold", self.threshold, -1.0, 1.0)
        check_range("text_threshold", self.text_threshold, -1.0, 1.0, optional=True)
