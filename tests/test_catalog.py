import json

import pandas as pd
import pytest

from prodfuse.data.catalog import Columns, read_catalog, resolve_image_paths


def write_csv(path, text):
    path.write_text(text)
    return path


def test_reads_csv_parquet_jsonl_alike(tmp_path):
    df = pd.DataFrame(
        {
            "product_id": ["007", "8"],
            "image_path": ["a.jpg", "b.jpg"],
            "title": ["Milk", None],
            "label": ["dairy", "dairy"],
        }
    )
    df.to_csv(tmp_path / "c.csv", index=False)
    df.to_parquet(tmp_path / "c.parquet")
    with open(tmp_path / "c.jsonl", "w") as f:
        for r in df.to_dict("records"):
            f.write(json.dumps(r) + "\n")
    for name in ("c.csv", "c.parquet", "c.jsonl"):
        got = read_catalog(tmp_path / name)
        assert list(got["product_id"]) == ["007", "8"], name  # leading zeros survive
        assert list(got["title"]) == ["Milk", ""], name  # missing text becomes empty, not NaN
        assert list(got["label"]) == ["dairy", "dairy"]


@pytest.mark.parametrize(
    "missing,flag", [("product_id", "--id-col"), ("image_path", "--image-col"), ("label", "--label-col")]
)
def test_missing_required_column_lists_existing(tmp_path, missing, flag):
    cols = [c for c in ("product_id", "image_path", "label", "title") if c != missing]
    p = write_csv(tmp_path / "c.csv", ",".join(cols) + "\n" + ",".join("x" for _ in cols) + "\n")
    with pytest.raises(ValueError) as e:
        read_catalog(p)
    msg = str(e.value)
    assert repr(missing) in msg and flag in msg
    for c in cols:
        assert c in msg  # the columns that do exist are listed


def test_label_optional_for_unlabelled_catalogs(tmp_path):
    p = write_csv(tmp_path / "c.csv", "product_id,image_path\n1,a.jpg\n")
    assert len(read_catalog(p, require_label=False)) == 1
    assert len(read_catalog(p, Columns(label=None))) == 1


def test_duplicate_ids(tmp_path):
    p = write_csv(tmp_path / "c.csv", "product_id,image_path,label\n1,a.jpg,x\n2,b.jpg,y\n1,c.jpg,x\n")
    with pytest.raises(ValueError, match=r"duplicate ids.*\['1'\]"):
        read_catalog(p)


def test_empty_catalog(tmp_path):
    for text in ("", "product_id,image_path,label\n"):
        p = write_csv(tmp_path / "c.csv", text)
        with pytest.raises(ValueError, match="empty"):
            read_catalog(p)


def test_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_catalog(tmp_path / "nope.csv")
    bad = tmp_path / "c.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="Cannot read catalog.*parquet"):
        read_catalog(bad)
    other = tmp_path / "c.xlsx"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown extension '\.xlsx'"):
        read_catalog(other)


def test_empty_label_is_an_error_naming_ids(tmp_path):
    p = write_csv(tmp_path / "c.csv", "product_id,image_path,label\n1,a.jpg,x\n2,b.jpg,\n")
    with pytest.raises(ValueError, match=r"empty 'label' \(ids \['2'\]\)"):
        read_catalog(p)


def test_image_paths_relative_to_catalog_and_confined(tmp_path):
    sub = tmp_path / "cat"
    sub.mkdir()
    p = write_csv(
        sub / "c.csv", "product_id,image_path,label\n1,img/a.jpg,x\n2,../secret.jpg,x\n3,/abs/b.jpg,x\n4,,x\n"
    )
    df = read_catalog(p)
    paths, reasons = resolve_image_paths(df, p, "image_path")
    assert paths[0] == str((sub / "img" / "a.jpg").resolve())
    assert paths[2] == "/abs/b.jpg"
    assert reasons == [None, "outside_catalog_dir", None, "missing_path"]
