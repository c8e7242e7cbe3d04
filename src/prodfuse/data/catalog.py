"""Reading and validating product catalogs (CSV, TSV, parquet, JSON Lines)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# The `detail` of a reject reason decided from the catalog alone (the path itself), for rejects.csv.
PATH_REJECT_DETAILS = {
    "missing_path": "the image column is empty for this row",
    "outside_catalog_dir": "the relative image path climbs out of the catalog's folder, which is refused so a catalog "
    "cannot make prodfuse read other files of this machine; move the photo under that folder or give an absolute path",
}


@dataclass(frozen=True)
class Columns:
    """Which catalog column plays which role. `label`/`split` may be None (unlabelled catalog / no split)."""

    id: str = "product_id"
    image: str = "image_path"
    text: tuple[str, ...] = ("title", "description")
    label: str | None = "label"
    split: str | None = "split"


# (resolved path, size, mtime_ns, inode) -> sha256 of files already hashed by this process.
_HASHED: dict[tuple, str] = {}


def cached_file_sha256(path: str | os.PathLike) -> str:
    """`file_sha256`, remembered per file identity (path, size, mtime, inode): a file checked on every use (shards
    read for many folds or seeds, model weights a service reloads) is hashed once while it stays untouched."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHED:  # two threads may hash the same file at once: both store the same value
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _decode_error(path: Path, encoding: str) -> ValueError:
    """Name the line and the byte that failed, and the fix (decodes the file again: parsers report chunk offsets)."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
        where = ""
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f": byte 0x{raw[e.start : e.start + 1].hex()} at offset {e.start} (line {line})"
    return ValueError(
        f"Cannot read catalog {str(path)!r} as {encoding}{where} is not valid {encoding}. Pass "
        f"--encoding with the file's encoding, e.g. --encoding latin-1 or --encoding cp1252."
    )


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot read catalog {str(path)!r}: unknown extension {path.suffix!r}. "
            f"Use one of {', '.join(sorted(FORMATS))}."
        )
    return fmt


def _read_table(path: Path, encoding: str = "utf-8", header_only: bool = False) -> pd.DataFrame:
    """The whole table, or with `header_only` its columns and at most one row (a cheap check of a big file)."""
    fmt = _format(path)
    try:
        if fmt == "parquet":
            if header_only:
                import pyarrow.parquet as pq

                return pd.DataFrame(columns=pq.read_schema(path).names)
            return pd.read_parquet(path)
        if fmt == "jsonl":
            return pd.read_json(
                path, lines=True, dtype=False, encoding=encoding, **({"nrows": 1} if header_only else {})
            )
        # Read everything as text: ids like "00123" must keep their zeros, and labels stay strings.
        return pd.read_csv(
            path,
            sep="\t" if fmt == "tsv" else ",",
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding=encoding,
            **({"nrows": 0} if header_only else {}),
        )
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except UnicodeDecodeError as e:
        raise _decode_error(path, encoding) from e
    except Exception as e:  # parser errors differ per format; all mean the same thing to the user
        raise ValueError(
            f"Cannot read catalog {str(path)!r} as {fmt}: {type(e).__name__}: {e}. "
            f"Check that the file is a valid {fmt} file."
        ) from e


def _require(df: pd.DataFrame, col: str, role: str, flag: str, path: Path) -> None:
    if col not in df.columns:
        raise ValueError(
            f"Catalog {str(path)!r} has no {role} column {col!r}; its columns are "
            f"{list(map(str, df.columns))}. Pass {flag} NAME to map it."
        )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(
            f"Catalog {str(path)!r} does not exist or is not a file. Pass --catalog PATH to an existing "
            f"CSV, parquet or JSON Lines file."
        )


def _require_columns(df: pd.DataFrame, columns: Columns, require_label: bool, path: Path) -> None:
    _require(df, columns.id, "id", "--id-col", path)
    _require(df, columns.image, "image", "--image-col", path)
    if columns.label is not None and (require_label or columns.label in df.columns):
        _require(df, columns.label, "label", "--label-col", path)


def catalog_columns(
    path: str | os.PathLike, columns: Columns = Columns(), require_label: bool = True, encoding: str = "utf-8"
) -> list[str]:
    """The catalog's column names, checked as `read_catalog` checks them but reading only its header: the errors a
    command can give in a second, before its heavy imports. Per-row checks are left to `read_catalog`."""
    path = Path(path)
    _check_file(path)
    df = _read_table(path, encoding, header_only=True)
    if len(df.columns) == 0:
        raise ValueError(f"Catalog {str(path)!r} is empty (no rows). It needs a header and at least one product.")
    _require_columns(df, columns, require_label, path)
    return [str(c) for c in df.columns]


def _file_lines(path: Path, index) -> str:
    """Where rows are in the file, as a user opens it: lines of a CSV/TSV (after the header) or JSON Lines file
    (quoted line breaks inside a CSV field would shift these), 1-based rows of a parquet file."""
    offset = {"csv": 2, "tsv": 2, "jsonl": 1}.get(FORMATS.get(path.suffix.lower()))
    if offset is None:
        return f"rows {[int(i) + 1 for i in index]} (counting from 1)"
    return f"lines {[int(i) + offset for i in index]}"


def read_catalog(
    path: str | os.PathLike, columns: Columns = Columns(), require_label: bool = True, encoding: str = "utf-8"
) -> pd.DataFrame:
    """Read and validate a catalog. Per-row problems (bad images, empty text) are left to extraction.

    Returns a DataFrame with ids, labels and splits as strings; text columns that are absent are simply not there.
    """
    path = Path(path)
    _check_file(path)
    df = _read_table(path, encoding)
    if len(df) == 0:
        raise ValueError(f"Catalog {str(path)!r} is empty (no rows). It needs a header and at least one product.")
    _require_columns(df, columns, require_label, path)
    if columns.split is not None and columns.split not in df.columns:
        columns = Columns(columns.id, columns.image, columns.text, columns.label, None)
    df = df.reset_index(drop=True)
    ids = df[columns.id]
    if ids.isna().any():
        raise ValueError(
            f"Catalog {str(path)!r} has {int(ids.isna().sum())} rows with an empty id "
            f"(column {columns.id!r}, {_file_lines(path, df.index[ids.isna()][:5])}). Every product needs an id."
        )
    df[columns.id] = ids.astype(str)
    dup = df[columns.id][df[columns.id].duplicated(keep=False)]
    if len(dup):
        examples = list(dict.fromkeys(dup))[:5]
        raise ValueError(
            f"Catalog {str(path)!r} has duplicate ids in column {columns.id!r}: {examples} "
            f"({dup.nunique()} ids repeated). Ids must be unique: de-duplicate the catalog first."
        )
    for col in (columns.label, columns.split):
        if col is not None and col in df.columns:
            if df[col].isna().any():
                rows = list(df[columns.id][df[col].isna()][:5])
                raise ValueError(
                    f"Catalog {str(path)!r} has {int(df[col].isna().sum())} rows with an empty "
                    f"{col!r} (ids {rows}). Fill or drop them."
                )
            df[col] = df[col].astype(str)
    for col in columns.text:
        if col in df.columns:
            df[col] = df[col].astype("string").fillna("")
    return df


def present_text_columns(df: pd.DataFrame, columns: Columns) -> list[str]:
    return [c for c in columns.text if c in df.columns]


def resolve_image_paths(
    df: pd.DataFrame, catalog_path: str | os.PathLike, image_col: str
) -> tuple[list[str], list[str | None]]:
    """Absolute image paths, and a reject reason per row (None when fine).

    A relative path that climbs out of the catalog's folder is rejected: a catalog from elsewhere should not be
    able to make us read arbitrary files on this machine.
    """
    base = Path(catalog_path).resolve().parent
    paths, reasons = [], []
    for raw in df[image_col].tolist():
        if raw is None or (isinstance(raw, float) and raw != raw) or str(raw).strip() == "":
            paths.append("")
            reasons.append("missing_path")
            continue
        p = Path(str(raw).strip())
        if p.is_absolute():
            paths.append(str(p))
            reasons.append(None)
            continue
        full = (base / p).resolve()
        paths.append(str(full))
        reasons.append(None if full.is_relative_to(base) else "outside_catalog_dir")
    return paths, reasons
