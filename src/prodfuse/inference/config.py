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
    # a run with a category hierarchy: each item's path stops at the deepest level whose probability reaches this
    min_confidence: float | None = None
    work: str | None = None  # where the catalog is embedded; None: <out without .csv>.embeddings/
    batch_size: int = 1024
    ocr_workers: int | None = None
    ocr_cache: str | None = None
    id_col: str | None = "product_id"  # None: this default
    image_col: str | None = "image_path"
    # The catalog's text columns, mapped in order onto the run's (None: the run's own names); column_map maps one
    # by name, "RUN_COLUMN=CATALOG_COLUMN". A catalog with none of them is an error unless allow_missing_text.
    text_cols: tuple[str, ...] | None = None
    column_map: tuple[str, ...] = ()
    allow_missing_text: bool = False
    label_col: str | None = None  # None: the run's label column, when the catalog has it; "": none
    split_col: str | None = "split"
    encoding: str = "utf-8"
    trust_pickle: bool = False  # load a pre-0.2 pickled TF-IDF state of the run's shards (runs code)
    progress: bool = True

    def __post_init__(self):
        if (self.catalog is None) == (self.embeddings is None):
            raise ValueError(
                f"give exactly one of catalog and embeddings; got catalog={self.catalog!r}, "
                f"embeddings={self.embeddings!r}"
            )
        check_range("top_k", self.top_k, 1, 1000, integer=True)
        from prodfuse.modeling.hierarchy import check_min_confidence

        object.__setattr__(self, "min_confidence", check_min_confidence(self.min_confidence))
        check_range("batch_size", self.batch_size, 1, 1 << 20, integer=True)
        check_range("ocr_workers", self.ocr_workers, 1, 256, integer=True, optional=True)
        for name, usual in (("id_col", "product_id"), ("image_col", "image_path")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, usual)
        if self.text_cols is not None:
            object.__setattr__(self, "text_cols", comma_list(self.text_cols))
        pairs = tuple(self.column_map or ())
        for pair in pairs:
            run_col, eq, catalog_col = str(pair).partition("=")
            if not eq or not run_col.strip() or not catalog_col.strip():
                raise ValueError(
                    f"column_map entry {pair!r} must be RUN_COLUMN=CATALOG_COLUMN, e.g. title=name (--column "
                    f"title=name feeds the catalog's 'name' to the run's 'title')"
                )
        object.__setattr__(self, "column_map", tuple("=".join(p.strip() for p in str(x).split("=", 1)) for x in pairs))
        blank_to_none(self, "split_col")  # label_col keeps "": no label column, where None means the run's

    @property
    def column_pairs(self) -> dict[str, str]:
        """column_map as {run column: catalog column}."""
        return dict(pair.split("=", 1) for pair in self.column_map)
