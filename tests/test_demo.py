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


def test_demo_run_folder_holds_a_model_card_with_metrics_json_figures(tmp_path, monkeypatch):
    """The README's demo, extract then train with no catalog, shard or run flags, made fast (no pretrained weights,
    32 px, no OCR, one epoch; ~1 min on 2 cores): its run folder's MODEL_CARD.md shows metrics.json's figures."""
    import json

    from prodfuse.cli import main
    from prodfuse.modeling.model_card import METRIC_COLUMNS, fmt

    monkeypatch.chdir(tmp_path)  # the demo writes data/demo, embeddings/demo and runs/ where it runs
    fast = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--ocr", "none", "--no-progress"]
    assert main(["extract", *fast]) == 0
    assert main(["train", "--epochs", "1", "--quiet"]) == 0
    run = tmp_path / "runs" / "demo-product"
    card = (run / "MODEL_CARD.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in card.splitlines()}
    for split in ("val", "test"):
        for model, figures in [("fused", metrics[split])] + [
            (f"{s} alone", metrics["streams"][s][split]) for s in ("image", "text")
        ]:
            cells = [c.strip() for c in rows[(split, model)].strip("|").split("|")[2:]]
            assert cells == [fmt(figures[k]) for k in METRIC_COLUMNS], (split, model)
    assert f"| test | fused | {metrics['test']['accuracy']:.4f} |" in card
