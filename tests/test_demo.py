import hashlib

import pandas as pd

from prodfuse.data.demo import CLASSES, PACKAGED, PER_CLASS, write_demo_catalog


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_shaped(tmp_path):
    a = write_demo_catalog(tmp_path / "a")
    b = write_demo_catalog(tmp_path / "b")
    assert digest(a.parent) == digest(b.parent)  # same bytes twice
    df = pd.read_csv(a, keep_default_na=False)
    assert len(df) == len(CLASSES) * PER_CLASS and df["product_id"].is_unique
    assert set(df["label"]) == set(CLASSES)
    assert (df["title"] == "").mean() > 0.1  # some items have no title at all
    # look-alike boxes: two flavours of a brand share the box, only the printed flavour tells them apart
    boxes = {}
    for label, (_brand, _flavour, box, ink) in PACKAGED.items():
        boxes.setdefault((box, ink), []).append(label)
    assert all(len(v) == 2 for v in boxes.values())
    produce = df[df["group"] == "produce"]
    assert not produce["title"].str.contains("ALPRO|VALIO", case=False).any()


def test_demo_written_once(tmp_path):
    p = write_demo_catalog(tmp_path)
    mtime = p.stat().st_mtime_ns
    assert write_demo_catalog(tmp_path) == p and p.stat().st_mtime_ns == mtime
