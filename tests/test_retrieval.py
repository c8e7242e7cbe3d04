"""Retrieval: the index (types, search, add, atomic save, bad input), duplicates and audit, the joint space, the
commands end to end on a tiny extracted catalog, and evaluate --exclude-duplicates-of."""

import json

import numpy as np
import pandas as pd
import pytest

from prodfuse.cli import main
from prodfuse.data import shards
from prodfuse.retrieval.config import AlignConfig, AuditConfig, IndexConfig, SearchConfig
from prodfuse.retrieval.duplicates import audit, duplicate_groups, near_duplicate_pairs
from prodfuse.retrieval.index import Index, choose_index_type, index_params
from prodfuse.retrieval.quality import precision_at_k
from synthetic import write_synthetic_shards
from test_predict import FAST, _write_catalog


def clustered(n, dim, clusters, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    which = rng.integers(0, clusters, n)
    return (centers[which] + noise * rng.normal(size=(n, dim))).astype(np.float32), which


def items(n, prefix="p"):
    return pd.DataFrame({"id": [f"{prefix}{i}" for i in range(n)], "label": [f"c{i % 3}" for i in range(n)]})


# ------------------------------------------------------------------------------------------------------- index


def test_index_type_is_chosen_by_size():
    assert [choose_index_type(n) for n in (10, 49_999, 50_000, 4_999_999, 5_000_000)] == [
        "flat",
        "flat",
        "ivfflat",
        "ivfflat",
        "ivfpq",
    ]
    p = index_params("ivfflat", 1_000_000, 256)
    assert p == {"nlist": 4000, "nprobe": 8}  # the benchmark's figures are for these
    assert index_params("ivfflat", 4_999_999, 256)["nprobe"] == 17


def test_flat_index_finds_each_item_itself_and_saves_atomically(tmp_path):
    x, _ = clustered(300, 16, 10)
    index = Index.build(x, items(300), {"space": "image"})
    assert index.manifest["index_type"] == "flat" and index.manifest["count"] == 300 and index.dim == 16
    hits = index.search(x[:5], k=3)
    assert [h["id"].iloc[0] for h in hits] == [f"p{i}" for i in range(5)]
    assert hits[0]["score"].iloc[0] == pytest.approx(1.0, abs=1e-5) and list(hits[0]["rank"]) == [1, 2, 3]
    # excluding the query item itself
    own = index.search(x[0], k=3, exclude=["p0"])[0]
    assert "p0" not in set(own["id"]) and len(own) == 3
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folder left beside it
    loaded = Index.load(tmp_path / "idx")
    assert loaded.manifest["index_sha256"] and len(loaded) == 300
    assert loaded.search(x[7], k=1)[0]["id"].iloc[0] == "p7"
    np.testing.assert_allclose(loaded.vector("p7"), x[7] / np.linalg.norm(x[7]), atol=1e-6)
    # saving again replaces the folder as a whole
    loaded.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_hnsw_and_ivfpq_agree_with_exact_search():
    x, _ = clustered(10_000, 16, 40, seed=1)
    q = x[:200] + 0.05 * np.random.default_rng(2).normal(size=(200, 16)).astype(np.float32)
    exact = Index.build(x, items(10_000), {"space": "image"}, "flat")
    truth = [set(h["id"]) for h in exact.search(q, k=10)]
    for kind, floor in (("ivfflat", 0.9), ("hnsw", 0.95), ("ivfpq", 0.3)):
        approx = Index.build(x, items(10_000), {"space": "image"}, kind)
        assert approx.manifest["index_type"] == kind and approx.manifest["params"]
        got = [set(h["id"]) for h in approx.search(q, k=10)]
        recall = np.mean([len(a & b) / 10 for a, b in zip(truth, got)])
        assert recall >= floor, (kind, recall)


def test_add_appends_without_rebuild_and_refuses_known_ids():
    x, _ = clustered(100, 8, 5)
    index = Index.build(x[:60], items(60), {"space": "image"})
    assert index.add(x[60:], items(100).iloc[60:], {"embeddings": "new"}) == 40
    assert len(index) == 100 and index.manifest["count"] == 100 and index.manifest["added"][0]["embeddings"] == "new"
    assert index.search(x[80], k=1)[0]["id"].iloc[0] == "p80"
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:2], items(2))


def test_ivfflat_adds_saves_loads_and_reconstructs(tmp_path):
    x, _ = clustered(3_000, 16, 20, seed=3)
    index = Index.build(x[:2_000], items(3_000).iloc[:2_000], {"space": "image"}, "ivfflat")
    assert index.manifest["params"] == {"nlist": 51, "nprobe": 8}
    index.add(x[2_000:], items(3_000).iloc[2_000:])
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.faiss_index.nprobe == 8 and len(loaded) == 3_000
    unit = x[2_500] / np.linalg.norm(x[2_500])
    np.testing.assert_allclose(loaded.vector("p2500"), unit, atol=1e-6)  # IVF-Flat keeps the full vector
    assert loaded.search(x[2_500], k=1)[0]["id"].iloc[0] == "p2500"


def test_index_bad_input_is_named(tmp_path):
    x, _ = clustered(50, 8, 5)
    index = Index.build(x, items(50), {"space": "text"})
    with pytest.raises(ValueError, match="query has 12 dimensions but this 'text' index holds 8-d"):
        index.search(np.ones(12, np.float32))
    with pytest.raises(ValueError, match="'image' space but this index holds 'text'"):
        index.search(x[0], space="image")
    with pytest.raises(ValueError, match="id 'nope' is not in this index"):
        index.vector("nope")
    with pytest.raises(ValueError, match="no vectors to index"):
        Index.build(np.zeros((0, 8), np.float32), items(0), {"space": "image"})
    with pytest.raises(ValueError, match="zero or not finite"):
        Index.build(np.zeros((3, 8), np.float32), items(3), {"space": "image"})
    with pytest.raises(ValueError, match="ivfflat index needs at least 624 vectors"):
        Index.build(x, items(50), {"space": "image"}, "ivfflat")
    with pytest.raises(ValueError, match="ivfpq index needs at least 9984 vectors"):
        Index.build(x, items(50), {"space": "image"}, "ivfpq")
    index.save(tmp_path / "idx")
    raw = (tmp_path / "idx" / "index.faiss").read_bytes()
    (tmp_path / "idx" / "index.faiss").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="damaged or was replaced"):
        Index.load(tmp_path / "idx")
    with pytest.raises(ValueError, match="not an index folder"):
        Index.load(tmp_path)


# -------------------------------------------------------------------------------------------------- duplicates


def test_near_duplicate_pairs_and_groups():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 32)).astype(np.float32)
    a[1] = a[0] + 0.01  # 0~1, 1~2: one group of three through a chain
    a[2] = a[1] + 0.01
    a[4] = a[3] * 2  # the same direction: cosine 1
    i, j, s = near_duplicate_pairs(a, threshold=0.99)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)] and (s >= 0.99).all()
    groups = duplicate_groups(6, i, j)
    assert groups[0] == groups[1] == groups[2] != groups[3] == groups[4] != groups[5]
    b = np.stack([a[5], rng.normal(size=32).astype(np.float32)])
    i, j, _ = near_duplicate_pairs(a, b, threshold=0.99)
    assert list(zip(i.tolist(), j.tolist())) == [(5, 0)]


def test_audit_writes_pairs_groups_and_summary(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.normal(size=(8, 16)).astype(np.float32)
    img[1] = img[0]
    img[2] = img[0] * 1.01
    txt = rng.normal(size=(8, 4)).astype(np.float32)
    txt[1] = txt[0]
    labels = np.array(["a", "a", "b", "c", "c", "d", "d", "e"])
    write_synthetic_shards(tmp_path / "a", img, txt, labels)
    s = audit(AuditConfig(embeddings=str(tmp_path / "a"), out=str(tmp_path / "audit")))
    assert s["pairs"] == 3 and s["groups"] == 1 and s["items_in_groups"] == 3 and s["pairs_with_different_labels"] == 2
    pairs = pd.read_csv(tmp_path / "audit" / "pairs.csv")
    assert set(zip(pairs["id_a"], pairs["id_b"])) == {("p0", "p1"), ("p0", "p2"), ("p1", "p2")}
    groups = pd.read_csv(tmp_path / "audit" / "groups.csv")
    assert groups.loc[0, "size"] == 3 and groups.loc[0, "ids"] == "p0 p1 p2" and bool(groups.loc[0, "mixed_labels"])
    # with the text as well only the pair whose texts match is left
    s = audit(AuditConfig(embeddings=str(tmp_path / "a"), out=str(tmp_path / "audit2"), text_threshold=0.99))
    assert s["pairs"] == 1
    # between two catalogs: b's first row repeats a's row 5
    write_synthetic_shards(tmp_path / "b", img[[5, 7]] * [[1.0], [-1.0]], txt[:2], labels[:2], ids=["q0", "q1"])
    s = audit(AuditConfig(embeddings=str(tmp_path / "a"), against=str(tmp_path / "b"), out=str(tmp_path / "ab")))
    assert s["pairs"] == 1 and s["items_with_a_duplicate_in_against"] == 1
    assert json.loads((tmp_path / "ab" / "summary.json").read_text())["against_items"] == 2


def test_precision_at_k_counts_labels_of_neighbours():
    x = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [-0.1, 1]], np.float32)
    labels = ["a", "a", "a", "b", "b", "b"]
    assert precision_at_k(x, labels, x, labels, k=2, same_set=True) == 1.0
    assert precision_at_k(x, labels, x, ["b"] * 6, k=2) == pytest.approx(0.5)  # a-queries 0, b-queries 1


# ------------------------------------------------------------------------------------------------ joint space


def test_align_learns_a_joint_space_far_above_chance(tmp_path):
    rng = np.random.default_rng(0)
    n = 700
    img = rng.normal(size=(n, 48)).astype(np.float32)
    txt = (img[:, :16] @ rng.normal(size=(16, 12)) + 0.3 * rng.normal(size=(n, 12))).astype(np.float32)
    split = np.where(np.arange(n) < 500, "train", "val")
    write_synthetic_shards(tmp_path / "emb", img, txt, np.array(["x"] * n), split=split)
    r = prodfuse_align(tmp_path / "emb", tmp_path / "align")
    m = r["metrics"]
    assert r["rows"]["val"] == 200 and r["rows"]["source"] == "split column 'split'"
    assert m["text_to_image"]["recall@10"] >= max(0.5, 8 * m["chance"]["recall@10"]), m
    assert m["image_to_text"]["mrr"] >= 0.3
    assert 0.01 <= r["temperature"] <= 1.0
    # the joint index holds the image side; a text query vector from the text tower finds its own product
    import keras

    from prodfuse.retrieval.align import embed_side

    idx = IndexConfig(embeddings=str(tmp_path / "emb"), out=str(tmp_path / "idx"), space="joint", run=r["out"])
    from prodfuse.retrieval.search import build_index

    built = build_index(idx)
    assert built["space"] == "joint" and built["count"] == n and built["dim"] == 256
    towers = keras.models.load_model(tmp_path / "align" / "model.keras", compile=False)
    q = embed_side(towers, "text", txt[500:600])
    hits = Index.load(tmp_path / "idx").search(q, k=10)
    assert np.mean([f"p{500 + i}" in set(h["id"]) for i, h in enumerate(hits)]) >= 0.5


def prodfuse_align(emb, out):
    from prodfuse.retrieval.align import align

    return align(AlignConfig(embeddings=str(emb), out=str(out), epochs=20, verbose=0, batch_size=50))


def test_config_checks_name_the_value():
    with pytest.raises(ValueError, match="space 'fused' needs run"):
        IndexConfig(embeddings="e", out="o", space="fused")
    with pytest.raises(ValueError, match="space 'image' takes the stored embeddings"):
        IndexConfig(embeddings="e", out="o", space="image", run="r")
    with pytest.raises(ValueError, match="space must be one of"):
        IndexConfig(embeddings="e", out="o", space="colour")
    with pytest.raises(ValueError, match="exactly one of id, image, text"):
        SearchConfig(index="i", id="a", text="b")
    with pytest.raises(ValueError, match="threshold must be a number in"):
        AuditConfig(embeddings="e", out="o", threshold=2)


# ------------------------------------------------------------------------------------- commands, end to end


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory):
    """30 products extracted (random small backbone, tfidf titles) and a gated run trained for 2 epochs."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("retrieval")
    catalog = _write_catalog(root / "train", 30)
    assert main(["extract", "--catalog", str(catalog), "--out", str(root / "emb"), *FAST]) == 0
    tf.config.run_functions_eagerly(True)  # 30 rows: tracing would be most of the training time
    try:
        args = ["train", "--embeddings", str(root / "emb"), "--out", str(root / "run"), "--epochs", "2", "--quiet"]
        assert main(args) == 0
    finally:
        tf.config.run_functions_eagerly(False)
    return root


def test_index_and_search_commands(catalog_run, capsys):
    root = catalog_run
    assert main(["index", "--embeddings", str(root / "emb"), "--space", "image", "--out", str(root / "ix-img")]) == 0
    assert "indexed 30 items (30 in all) in the image space" in capsys.readouterr().out
    out_csv = root / "res.csv"
    assert main(["search", "--index", str(root / "ix-img"), "--id", "train-3", "--k", "4", "--out", str(out_csv)]) == 0
    res = pd.read_csv(out_csv)
    assert len(res) == 4 and "train-3" not in set(res["id"]) and list(res["rank"]) == [1, 2, 3, 4]
    assert {"score", "label", "text", "image_path"} <= set(res.columns)
    # a new photo is embedded with the shards' own backbone: the stored photo finds itself at cosine 1
    photo = root / "train" / "img" / "3.png"
    assert main(["search", "--index", str(root / "ix-img"), "--image", str(photo), "--out", str(out_csv)]) == 0
    res = pd.read_csv(out_csv)
    assert res["id"].iloc[0] == "train-3" and res["score"].iloc[0] == pytest.approx(1.0, abs=1e-4)
    # words in the text space
    assert main(["index", "--embeddings", str(root / "emb"), "--space", "text", "--out", str(root / "ix-txt")]) == 0
    assert "left out {'without_text': 6}" in capsys.readouterr().out  # every 5th title is empty
    assert (
        main(["search", "--index", str(root / "ix-txt"), "--text", "red cotton shirt size 2", "--out", str(out_csv)])
        == 0
    )
    assert pd.read_csv(out_csv)["label"].iloc[0] == "red"
    # the wrong query for a space is a clear error, exit 2
    assert main(["search", "--index", str(root / "ix-img"), "--text", "red"]) == 2
    assert "an image index is searched with an image or an id" in capsys.readouterr().err
    assert main(["search", "--index", str(root / "ix-img"), "--id", "nope"]) == 2
    assert "id 'nope' is not in this index" in capsys.readouterr().err


def test_fused_index_and_add(catalog_run, capsys):
    root = catalog_run
    args = ["index", "--embeddings", str(root / "emb"), "--space", "fused", "--run", str(root / "run")]
    assert main([*args, "--out", str(root / "ix-fused")]) == 0
    m = json.loads((root / "ix-fused" / "manifest.json").read_text())
    assert m["space"] == "fused" and m["count"] == 30 and m["run"] and m["run_model_sha256"]
    assert m["shards_manifest_sha256"] and m["index_type"] == "flat"
    # a fused query from words alone goes through the run's own pipeline
    assert main(["search", "--index", str(root / "ix-fused"), "--text", "blue cotton shirt", "--k", "3"]) == 0
    # new items extracted --like the training shards are added without a rebuild
    new = _write_catalog(root / "new", 6, seed=3)
    like = [
        "extract",
        "--catalog",
        str(new),
        "--out",
        str(root / "emb-new"),
        "--like",
        str(root / "emb"),
        "--no-progress",
    ]
    assert main(like) == 0
    assert main(["index", "--out", str(root / "ix-fused"), "--add", str(root / "emb-new")]) == 0
    assert "indexed 6 items (36 in all)" in capsys.readouterr().out
    m = json.loads((root / "ix-fused" / "manifest.json").read_text())
    assert m["count"] == 36 and m["added"][0]["count"] == 6
    # --embeddings with --add builds from the first and appends the second, whatever index was at --out
    assert main([*args, "--out", str(root / "ix-fused"), "--add", str(root / "emb-new")]) == 0
    assert "indexed 36 items (36 in all)" in capsys.readouterr().out
    m = json.loads((root / "ix-fused" / "manifest.json").read_text())
    assert m["count"] == 36 and len(m["added"]) == 1 and m["embeddings"] == str((root / "emb").resolve())
    # shards with their own tfidf fit (not --like the run's) cannot go in a fused index
    other = ["extract", "--catalog", str(new), "--out", str(root / "emb-other"), *FAST]
    assert main(other) == 0
    assert main([*args[:2], str(root / "emb-other"), *args[3:], "--out", str(root / "ix-bad")]) == 2
    assert "have their own tfidf text encoder" in capsys.readouterr().err
    assert not (root / "ix-bad").exists()


def test_evaluate_excludes_near_duplicates_of_train(catalog_run, capsys):
    root = catalog_run
    out = root / "eval-dup"
    args = ["evaluate", "--run", str(root / "run"), "--out", str(out), "--exclude-duplicates-of", str(root / "emb")]
    # the photos of one colour are near duplicates at this tiny backbone's resolution: a low threshold finds all
    assert main([*args, "--duplicate-threshold", "-1"]) == 0
    wd = json.loads((out / "metrics.json").read_text())["without_duplicates"]
    total = json.loads((out / "metrics.json").read_text())["n"]
    assert wd["duplicates"] == total and wd["n"] == 0
    assert main([*args, "--duplicate-threshold", "1"]) == 0
    wd = json.loads((out / "metrics.json").read_text())["without_duplicates"]
    assert wd["duplicates"] == 0 and wd["n"] == total
    assert "without the 0 items that have a near duplicate" in capsys.readouterr().out
    assert "near-duplicate photo" in (out / "report.md").read_text()


def test_audit_command(catalog_run, capsys):
    root = catalog_run
    assert main(["audit", "--embeddings", str(root / "emb"), "--threshold", "0.999", "--out", str(root / "audit")]) == 0
    s = json.loads((root / "audit" / "summary.json").read_text())
    assert s["items"] == 30 and "near-duplicate pairs" in capsys.readouterr().out
    assert (root / "audit" / "pairs.csv").is_file() and (root / "audit" / "groups.csv").is_file()
    assert shards.read_manifest(root / "emb")["rows"] == 30
