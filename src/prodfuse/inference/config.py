"""PredictConfig: the settings of `predict` on a catalog or a shard folder, their defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass

from prodfuse.checks import blank_to_none, check_range, comma_list


@dataclass(frozen=True)
class PredictConfig:
    """Top-k labels for a new catalog (embedded like the run's training data) or an already-embedded folder."""

    run: str
    out: str
    catalog: str | None = None
    embeddings: str | None = None
    top_k: int = 3
    work: str | None = None  # where the catalog is embedded; None: <out without .csv>.embeddings/
    batch_size: int = 1024
    ocr_workers: int | None = None
    ocr_cache: str | None = None
    id_col: str = "product_id"
    image_col: str = "image_path"
    text_cols: tuple[str, ...] | None = None  # None: the run's
    label_col: str | None = "label"
    split_col: str | None = "split"
    encoding: str = "utf-8"
    progress: bool = True

    def __post_init__(self):
        if (self.catalog is None) == (self.embeddings is None):
            raise ValueError(
                f"give exactly one of catalog and embeddings; got catalog={self.catalog!r}, "
                f"embeddings={self.embeddings!r}"
            )
        check_range("top_k", self.top_k, 1, 1000, integer=True)
        check_range("batch_size", self.batch_size, 1, 1 << 20, integer=True)
        check_range("ocr_workers", self.ocr_workers, 1, 256, integer=True, optional=True)
        if self.text_cols is not None:
            object.__setattr__(self, "text_cols", comma_list(self.text_cols))
        blank_to_none(self, "label_col", "split_col")
