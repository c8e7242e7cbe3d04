"""ExtractConfig: every setting of an extraction, its default and its check, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from prodfuse.checks import blank_to_none, check_choice, check_range, comma_list
from prodfuse.encoders.views import CROP_SCALE, MAX_VIEWS

BACKBONES = ("resnet50", "mobilenet_v2", "efficientnet_b0")
PRECISIONS = ("float32", "mixed_float16")
TEXT_ENCODERS = ("minilm", "tfidf", "none")
OCR_ENGINES = ("rapidocr", "tesseract", "easyocr", "none")
ENGINES = ("local", "ray")
# The text encoder and vocabulary are fitted on every non-empty text up to this many, above it on a seeded sample
# of this many (recorded in the manifest as text_fit).
TEXT_FIT_MAX_ROWS = 1_000_000
# --views auto: augmented views for catalogs up to this many rows. Small catalogs are where augmentation pays
# (grocery, 2,640 photos: +7 points) and where 6x the backbone time is minutes; big ones have data enough.
AUTO_VIEWS_MAX_ROWS = 5000
# What an unset (None) setting becomes when no --like folder supplies it.
DEFAULTS = {
    "backbone": "resnet50",
    "weights": "imagenet",
    "image_size": 224,
    "precision": "float32",
    "text_encoder": "minilm,tfidf",  # each part side by side: better than either alone on every shared data set
    "text_model": None,
    "ocr": "rapidocr",
    "ocr_lang": None,
    "shard_rows": 10_000,
    "text_cols": ("title", "description"),
    "views": "auto",
    "crop_scale": CROP_SCALE,
}
# The catalog column a role is read from when neither its flag nor a --like folder names one.
COLUMN_DEFAULTS = {"id": "product_id", "image": "image_path", "label": "label", "split": "split"}
# Settings that `like` copies from another shard folder (everything that changes the numbers; the catalog
# columns, from its manifest's `columns`, are carried too: see resolve_columns).
LIKE_KEYS = (
    "backbone",
    "weights",
    "image_size",
    "precision",
    "text_encoder",
    "text_model",
    "ocr",
    "ocr_lang",
    "text_cols",
    "views",
    "crop_scale",
)


def parse_views(value) -> int | str:
    """ "auto" or an int in 1..MAX_VIEWS (flags arrive as text)."""
    if value == "auto":
        return value
    try:
        views = int(value)
    except (TypeError, ValueError):
        views = None
    if views is None or str(views) != str(value).strip() or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views must be auto or an integer in [1, {MAX_VIEWS}]; got {value!r}")
    return views


class ExtractionStopped(RuntimeError):
    """`extract` saw its `stop` event set: complete shards and image chunks are kept; the same call resumes."""


@dataclass(frozen=True)
class ExtractConfig:
    """What `extract` reads, how it embeds it and where it writes.

    Settings left None take the `like` folder's value, else DEFAULTS; an explicit one that contradicts `like`
    is an error. `catalog=None` builds and embeds the built-in demo catalog.
    """

    catalog: str | None = None
    out: str | None = None
    backbone: str | None = None
    weights: str | None = None  # imagenet | none | path to a local no-top .h5 / .weights.h5
    image_size: int | None = None
    precision: str | None = None
    batch_size: int | None = None  # images per backbone batch; None: 64 on CPU, 256 on a GPU
    views: int | str | None = None
    crop_scale: float | None = None  # the views' crops, a fraction of each side; None: 0.6 (or --like's)
    text_encoder: str | None = None
    text_model: str | None = None
    ocr: str | None = None
    ocr_lang: str | None = None
    ocr_workers: int | None = None  # None: one per core
    ocr_cache: str | None = None  # None: ~/.cache/prodfuse/ocr
    shard_rows: int | None = None
    like: str | None = None
    overwrite: bool = False
    trust_pickle: bool = False  # load a --like folder's pre-0.2 pickled TF-IDF state (runs code: own folders only)
    progress: bool = True
    # Catalog columns. None: the `like` folder's, else COLUMN_DEFAULTS; "" (label, split): the catalog has none.
    id_col: str | None = None
    image_col: str | None = None
    text_cols: tuple[str, ...] | None = None
    label_col: str | None = None
    split_col: str | None = None
    encoding: str = "utf-8"
    # Where stage A (OCR + backbone) runs: this process and its OCR workers, or a Ray cluster (see ray_engine).
    engine: str = "local"
    ray_address: str | None = None  # None: a local Ray cluster (or the caller's ray.init); auto; HOST:PORT
    image_actors: int | None = None  # None: one per GPU, else 1
    ocr_actors: int | None = None  # None: the cluster's CPUs (less one per GPU image actor)
    gpus_per_image_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0

    def __post_init__(self):
        check_choice("backbone", self.backbone, BACKBONES, optional=True)
        check_choice("precision", self.precision, PRECISIONS, optional=True)
        if self.text_encoder is not None:
            from prodfuse.encoders.text import parse_kinds

            object.__setattr__(self, "text_encoder", ",".join(parse_kinds(self.text_encoder)))
        check_choice("ocr", self.ocr, OCR_ENGINES, optional=True)
        check_range("image_size", self.image_size, 32, 2048, integer=True, optional=True)
        check_range("batch_size", self.batch_size, 1, 65536, integer=True, optional=True)
        check_range("ocr_workers", self.ocr_workers, 1, 256, integer=True, optional=True)
        check_range("shard_rows", self.shard_rows, 1, None, integer=True, optional=True)
        check_range("crop_scale", self.crop_scale, 0.2, 1.0, optional=True)
        check_choice("engine", self.engine, ENGINES)
        check_range("image_actors", self.image_actors, 1, 4096, integer=True, optional=True)
        check_range("ocr_actors", self.ocr_actors, 1, 100_000, integer=True, optional=True)
        check_range("gpus_per_image_actor", self.gpus_per_image_actor, 0, 8, optional=True)
        blank_to_none(self, "ray_address")
        ray_only = ("ray_address", "image_actors", "ocr_actors", "gpus_per_image_actor")
        given = [k for k in ray_only if getattr(self, k) is not None]
        if self.engine != "ray" and given:
            raise ValueError(
                f"{', '.join(given)} apply to engine 'ray' only; got engine {self.engine!r}. Add --engine ray."
            )
        if self.views is not None:
            object.__setattr__(self, "views", parse_views(self.views))
        if self.text_cols is not None:
            object.__setattr__(self, "text_cols", comma_list(self.text_cols))
        # label_col and split_col keep "" (no such column): None means "the like folder's, else the usual one".
        if self.id_col == "" or self.image_col == "":
            raise ValueError(f"id_col and image_col must name columns; got {self.id_col!r}, {self.image_col!r}")
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(
                f"encoding {self.encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)"
            ) from None


def resolve_columns(config: ExtractConfig, like_columns: dict | None = None) -> dict:
    """{"id", "image", "label", "split"}: each role's catalog column, or None (no label / no split). A column flag
    given wins; else the `like` folder's manifest `columns` (its label even when that is None: an unlabelled
    folder); else COLUMN_DEFAULTS. A split column the `like` folder lacked falls back to "split" (read only if
    present)."""
    out = {}
    for role, usual in COLUMN_DEFAULTS.items():
        given = getattr(config, f"{role}_col")
        recorded = (like_columns or {}).get(role)
        if given is not None:
            out[role] = given or None
        elif like_columns is not None and role in like_columns and (recorded or role == "label"):
            out[role] = recorded
        else:
            out[role] = usual
    return out
