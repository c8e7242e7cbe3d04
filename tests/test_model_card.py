"""The model card of a run folder: written by train with metrics.json's figures, updated by evaluate (one section per
evaluated folder and split, replaced on re-evaluation), listing classes with few training items."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import prodfuse
from prodfuse.modeling.model_card import CARD_FILE, METRIC_COLUMNS, fmt, model_card, render_model_card
from synthetic import image_vs_text_classes, write_synthetic_shards

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A product-fusion run on 120 synthetic rows in 4 classes plus one class, `rare`, with a single item (too few
    to split: it trains)."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("card")
    image, text, labels = image_vs_text_classes(n_per_class=30, image_dim=16, text_dim=8, seed=1)
    image = np.concatenate([image, image[:1] + 3.0])
    text = np.concatenate([text, text[:1]])
    labels = np.concatenate([labels, ["rare"]])
    emb = write_synthetic_shards(root / "emb", image, text, labels)
    tf.config.run_functions_eagerly(True)  # on 121 rows graph tracing would be most of the training time
    try:
        prodfuse.train(
            prodfuse.TrainConfig(embeddings=str(emb), out=str(root / "run"), epochs=2, batch_size=32, verbose=0)
        )
    finally:
        tf.config.run_functions_eagerly(False)
    return root / "run"


def table_row(markdown: str, *first_cells: str) -> list[str]:
    """The cells of the Markdown table row that starts with `first_cells`."""
    start = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_train_writes_a_card_whose_figures_are_metrics_json(run):
    text = (run / CARD_FILE).read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    card = model_card(run)
    json.dumps(card, allow_nan=False)  # the service returns it as strict JSON
    assert render_model_card(card) == text
    assert card["metrics"]["val"] == metrics["val"] and card["metrics"]["test"] == metrics["test"]
    for split in ("val", "test"):
        assert table_row(text, split, "fused")[2:] == [fmt(metrics[split][k]) for k in METRIC_COLUMNS]
        for stream in ("image", "text"):
            assert card["metrics"]["streams"][stream][split] == metrics["streams"][stream][split]
            cells = table_row(text, split, f"{stream} alone")[2:]
            assert cells == [fmt(metrics["streams"][stream][split][k]) for k in METRIC_COLUMNS]
    # data and fusion
    s = config["splits"]
    assert card["data"]["rows"] == s["train"] + s["val"] + s["test"] == 121
    assert card["data"]["classes"] == 5 and card["data"]["label_column"] == "label"
    assert f"- Rows: 121 (train {s['train']}, val {s['val']}, test {s['test']})" in text
    fit = config["product_fusion"]["fit"]
    weights = card["fusion"]["product_weights"][0]
    # the default product: image, text and the linear probe as a third expert
    assert card["fusion"]["fusion"] == "product"
    assert [weights["image"], weights["text"], weights["probe"]] == fit["product"]["weights"]
    assert table_row(text, "fit")[1:4] == [fmt(w) for w in fit["product"]["weights"]]
    assert "+ c log p_probe" in text
    assert not card["calibration"]["fitted"] and "Not calibrated yet" in text
    # no server path but the catalog and shard paths config.json records
    recorded = {config["embeddings"], config["extraction"]["catalog_path"]}
    strings = re.findall(r'"(/[^"]*)"', json.dumps(card))
    assert set(strings) <= recorded, strings


def test_a_class_with_one_training_item_is_a_known_limit(run):
    limits = model_card(run)["known_limits"]
    assert limits["few_training_items"] == [{"label": "rare", "items": 1}]
    assert "rare" in limits["absent_from"]["val"] and "rare" in limits["absent_from"]["test"]
    text = (run / CARD_FILE).read_text()
    limits_section = text.split("## Known limits", 1)[1]
    assert "Classes with fewer than 5 training items: `rare` (1)" in limits_section
    assert "Classes absent from test" in limits_section and "`rare`" in limits_section


def test_evaluate_adds_its_section_and_reevaluating_replaces_it(run, tmp_path):
    import tensorflow as tf

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tf.config.run_functions_eagerly(True)
    try:
        first = prodfuse.evaluate(prodfuse.EvaluateConfig(run=str(copy)))
        again = prodfuse.evaluate(prodfuse.EvaluateConfig(run=str(copy)))
        val = prodfuse.evaluate(prodfuse.EvaluateConfig(run=str(copy), split="val"))
    finally:
        tf.config.run_functions_eagerly(False)
    text = (copy / CARD_FILE).read_text()
    assert text.count("## Evaluations") == 1
    assert text.count("### `test` rows of") == 1 and text.count("### `val` rows of") == 1
    assert first["accuracy"] == again["accuracy"]
    card = model_card(copy)
    assert [e["split"] for e in card["evaluations"]] == ["test", "val"]  # one each
    for e, r in ((e, {"test": again, "val": val}[e["split"]]) for e in card["evaluations"]):
        assert (
            e["accuracy"] == pytest.approx(r["accuracy"]) and e["n"] == r["n"] and e["report"] == f"eval-{r['split']}"
        )
    section = text.split("### `test` rows of", 1)[1].split("###", 1)[0]
    assert f"| {fmt(again['accuracy'])} | {fmt(again['top3_accuracy'])} |" in section
    # the card was written after calibration: the temperature evaluate fitted is on it
    assert card["calibration"]["fitted"] and card["calibration"]["temperature"] == pytest.approx(again["temperature"])
    # the training figures are untouched
    assert card["metrics"]["test"] == json.loads((copy / "metrics.json").read_text())["test"]


def test_card_of_a_prodfuse_0_1_run_folder_and_of_no_run_folder(tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", copy)
    card = model_card(copy)
    json.dumps(card, allow_nan=False)
    assert card["fusion"]["fusion"] == "gated" and card["known_limits"]["few_training_items"] is None
    assert card["calibration"]["fitted"]  # its temperature.json carries no fingerprint: trusted, as Run.load does
    assert "not recorded for this run" in render_model_card(card)
    with pytest.raises(ValueError, match="not a complete run folder"):
        model_card(tmp_path / "nothing")
