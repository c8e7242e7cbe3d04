"""Extraction end to end on tiny catalogs: rejects, resume after a kill, --like reuse, settings mismatch."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from prodfuse.cli import build_parser, main
from prodfuse.cli import extract as extract_cli
from prodfuse.data import shards
from prodfuse.encoders import image as image_encoders
from prodfuse.encoders.text import MINILM_SHA256
from prodfuse.extraction import extract

FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--ocr", "none", "--no-progress"]


def config(*argv):
    """The ExtractConfig the command line makes of `prodfuse extract ARGV`."""
    return extract_cli.config(build_parser().parse_args(["extract", *argv]))


def run(catalog, out, *extra):
    return extract.extract(config("--catalog", str(catalog), "--out", str(out), *FAST, *extra))


def test_bad_images_are_rejected_with_reasons_and_good_rows_kept(tiny_catalog, tmp_path):
    img = tiny_catalog.parent / "img"
    (img / "empty.png").write_bytes(b"")
    (img / "text.jpg").write_text("this is not an image")
    good = (img / "0.png").read_bytes()
    Image.open(img / "0.png").convert("RGB").save(img / "full.jpg", quality=90)
    (img / "trunc.jpg").write_bytes((img / "full.jpg").read_bytes()[:200])
    (tmp_path.parent / "outside.png").write_bytes(good)
    with open(tiny_catalog, "a") as f:
        f.write("b1,img/missing.png,t,,red,a\n")
        f.write("b2,img/empty.png,t,,red,a\n")
        f.write("b3,img/text.jpg,t,,red,a\n")
        f.write("b4,img/trunc.jpg,t,,red,a\n")
        f.write(f"b5,../../{tmp_path.parent.name}/outside.png,t,,red,a\n")
        f.write("b6,,t,,red,a\n")
    out = tmp_path / "emb"
    summary = run(tiny_catalog, out, "--shard-rows", "5")
    got = shards.read_shards(out)
    assert sorted(got["product_id"]) == sorted(f"p{i}" for i in range(12))
    with open(out / "rejects.csv") as f:
        reasons = {r["id"]: r["reason"] for r in csv.DictReader(f)}
    assert reasons == {
        "b1": "missing_file",
        "b2": "empty_file",
        "b3": "not_an_image",
        "b4": "truncated_image",
        "b5": "outside_catalog_dir",
        "b6": "missing_path",
    }
    assert summary["embedded_rows"] + summary["rejected_rows"] == summary["input_rows"] == 18
    assert summary["rejected_by_reason"]["missing_file"] == 1


def test_shard_contents(tiny_catalog, tmp_path):
    out = tmp_path / "emb"
    run(tiny_catalog, out, "--shard-rows", "5")
    m = shards.read_manifest(out)
    assert [s["rows"] for s in m["shards"]] == [5, 5, 2]
    # the default text encoder: MiniLM (from its package) and TF-IDF side by side, each part unit length
    assert m["encoders"]["image"]["dim"] == 1280 and m["encoders"]["text"]["dim"] == 768
    assert m["encoders"]["text"]["parts"] == [{"kind": "minilm", "dim": 384}, {"kind": "tfidf", "dim": 384}]
    assert m["encoders"]["text"]["minilm"]["sha256"] == MINILM_SHA256
    got = shards.read_shards(out)
    assert got["image_embedding"].shape == (12, 1280) and got["text_embedding"].shape == (12, 768)
    assert got["tokens"].shape == (12, 60)
    # items 0, 4, 8 have no title and (no OCR) no text: has_text False, zero vector, all-padding tokens
    no_text = np.array([i % 4 == 0 for i in range(12)])
    np.testing.assert_array_equal(got["has_text"], ~no_text)
    assert not got["text_embedding"][no_text].any() and not got["tokens"][no_text].any()
    for part in (slice(0, 384), slice(384, 768)):
        assert np.allclose(np.linalg.norm(got["text_embedding"][~no_text, part], axis=1), 1, atol=1e-5)
    assert list(got["group"][:2]) == ["a", "a"] and "title" not in got  # non-text columns carried, text not
    assert got["text"][1] == "green thing number 1"


def test_kill_then_rerun_equals_uninterrupted(tiny_catalog, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    run(tiny_catalog, ref, "--shard-rows", "4")
    killed = tmp_path / "killed"
    real_write = shards.write_shard
    calls = {"n": 0}

    def dying_write(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_write(*a, **k)

    monkeypatch.setattr(shards, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_catalog, killed, "--shard-rows", "4")
    monkeypatch.setattr(shards, "write_shard", real_write)
    assert len(shards.read_manifest(killed)["shards"]) == 1
    # a second kill, this time in the image stage of a fresh folder, after the first chunk
    killed2 = tmp_path / "killed2"
    real_iter = image_encoders.iter_image_embeddings
    chunks = {"n": 0}

    def dying_iter(*a, **k):
        chunks["n"] += 1
        if chunks["n"] == 2:
            raise KeyboardInterrupt("killed")
        yield from real_iter(*a, **k)

    monkeypatch.setattr(image_encoders, "iter_image_embeddings", dying_iter)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_catalog, killed2, "--shard-rows", "4")
    monkeypatch.setattr(image_encoders, "iter_image_embeddings", real_iter)
    for folder in (killed, killed2):
        summary = run(tiny_catalog, folder, "--shard-rows", "4")
        assert summary["embedded_rows"] == 12
        a, b = shards.read_shards(ref), shards.read_shards(folder)
        assert list(a["product_id"]) == list(b["product_id"])  # nothing lost or doubled, same order
        for col in ("image_embedding", "text_embedding", "tokens", "has_text"):
            np.testing.assert_array_equal(a[col], b[col])
        assert not (folder / ".work").exists()


def test_rerun_of_complete_folder_does_nothing(tiny_catalog, tmp_path):
    out = tmp_path / "emb"
    run(tiny_catalog, out)
    before = (out / "part-00000.parquet").stat().st_mtime_ns
    summary = run(tiny_catalog, out)
    assert summary["embedded_this_run"] == 0 and summary["embedded_rows"] == 12
    assert (out / "part-00000.parquet").stat().st_mtime_ns == before


def test_like_reuses_settings_and_fitted_text_encoder(tiny_catalog, tmp_path):
    train = tmp_path / "train"
    run(tiny_catalog, train)
    # a "new" catalog: a subset of the same items in another order, another folder, no label column
    new_dir = tmp_path / "new"
    shutil.copytree(tiny_catalog.parent / "img", new_dir / "img")
    lines = tiny_catalog.read_text().splitlines()
    rows = [",".join(line.split(",")[:4]) for line in [lines[0]] + lines[1:][::-1][:5]]
    (new_dir / "c.csv").write_text("\n".join(rows) + "\n")
    extract.extract(
        config(
            "--catalog",
            str(new_dir / "c.csv"),
            "--out",
            str(tmp_path / "n"),
            "--like",
            str(train),
            "--label-col",
            "",
            "--no-progress",
        )
    )
    a, b = shards.read_shards(train), shards.read_shards(tmp_path / "n")
    pos = {pid: i for i, pid in enumerate(a["product_id"])}
    idx = [pos[p] for p in b["product_id"]]
    np.testing.assert_array_equal(a["text_embedding"][idx], b["text_embedding"])  # identical vectors
    np.testing.assert_allclose(a["image_embedding"][idx], b["image_embedding"], atol=1e-5)
    np.testing.assert_array_equal(a["tokens"][idx], b["tokens"])
    assert shards.read_manifest(tmp_path / "n")["settings"]["image_size"] == 32


def test_views_crop_scale_is_recorded_and_like_keeps_it(tiny_catalog, tmp_path):
    train = tmp_path / "train"
    run(tiny_catalog, train, "--views", "2")  # the default, 60%
    m = shards.read_manifest(train)
    assert m["settings"]["crop_scale"] == m["encoders"]["image"]["crop_scale"] == 0.6
    # --like copies it; a folder from before the scale was recorded (80% crops) gives 80% crops
    extract.extract(config("--catalog", str(tiny_catalog), "--out", str(tmp_path / "same"), "--like", str(train)))
    assert shards.read_manifest(tmp_path / "same")["encoders"]["image"]["crop_scale"] == 0.6
    old = tmp_path / "old"
    shutil.copytree(train, old)
    m_old = shards.read_manifest(old)
    del m_old["settings"]["crop_scale"], m_old["encoders"]["image"]["crop_scale"]
    shards.save_manifest(old, m_old)
    extract.extract(config("--catalog", str(tiny_catalog), "--out", str(tmp_path / "n"), "--like", str(old)))
    m_new = shards.read_manifest(tmp_path / "n")
    # 80% (what older folders used) is not recorded: those folders resume with no difference
    assert "crop_scale" not in m_new["settings"] and "crop_scale" not in m_new["encoders"]["image"]
    assert run(tiny_catalog, old, "--views", "2", "--crop-scale", "0.8")["embedded_this_run"] == 0
    # without --crop-scale an older folder is not silently mixed with 60% crops
    with pytest.raises(ValueError, match="crop_scale"):
        run(tiny_catalog, old, "--views", "2")
    a, b = shards.read_shards(train), shards.read_shards(tmp_path / "n")
    np.testing.assert_allclose(a["image_embedding"], b["image_embedding"], atol=1e-5)  # the whole photo: the same
    assert np.abs(a["image_views"] - b["image_views"]).max() > 1e-3  # the crops: another scale
    with pytest.raises(ValueError, match="--crop-scale 0.5 contradicts --like"):
        extract.extract(
            config(
                "--catalog",
                str(tiny_catalog),
                "--out",
                str(tmp_path / "x"),
                "--like",
                str(train),
                "--crop-scale",
                "0.5",
            )
        )
    with pytest.raises(ValueError, match=r"--crop-scale must be a number in \[0.2, 1.0\]; got 1.5"):
        config("--catalog", str(tiny_catalog), "--out", str(tmp_path / "y"), "--crop-scale", "1.5")


def test_like_contradicting_flag_is_an_error(tiny_catalog, tmp_path):
    train = tmp_path / "train"
    run(tiny_catalog, train)
    cfg = config(
        "--catalog", str(tiny_catalog), "--out", str(tmp_path / "x"), "--like", str(train), "--image-size", "64"
    )
    with pytest.raises(ValueError, match="--image-size 64 contradicts --like"):
        extract.extract(cfg)


def test_settings_mismatch_stops_with_the_setting(tiny_catalog, tmp_path, capsys):
    out = tmp_path / "emb"
    run(tiny_catalog, out)
    code = main(
        [
            "extract",
            "--catalog",
            str(tiny_catalog),
            "--out",
            str(out),
            *FAST[:-3],
            "--ocr",
            "none",
            "--no-progress",
            "--image-size",
            "48",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "image_size: existing 32, requested 48" in err and "--overwrite" in err
    assert (
        main(
            [
                "extract",
                "--catalog",
                str(tiny_catalog),
                "--out",
                str(out),
                *FAST[:4],
                "--image-size",
                "48",
                "--ocr",
                "none",
                "--no-progress",
                "--overwrite",
            ]
        )
        == 0
    )
    assert shards.read_manifest(out)["settings"]["image_size"] == 48


def test_bad_catalog_is_a_clean_error(tmp_path, capsys):
    p = tmp_path / "c.csv"
    p.write_text("id,img\n1,a.png\n")
    assert main(["extract", "--catalog", str(p), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no id column 'product_id'" in err and "['id', 'img']" in err


def test_stop_event_stops_extraction_and_the_same_call_resumes(tiny_catalog, tmp_path):
    """A service (or the CLI's signal handler) stops extraction through an event, checked between batches."""
    import threading

    from prodfuse.extraction.config import ExtractionStopped

    stop = threading.Event()
    stop.set()
    out = tmp_path / "emb"
    cfg = config("--catalog", str(tiny_catalog), "--out", str(out), *FAST, "--shard-rows", "5")
    with pytest.raises(ExtractionStopped, match="resume"):
        extract.extract(cfg, stop)
    assert not list(out.glob("part-*"))  # stopped before its first shard
    summary = extract.extract(cfg)  # the same call, no event: completes
    assert summary["embedded_rows"] + summary["rejected_rows"] == summary["input_rows"] == 12


def test_interrupt_at_60_percent_keeps_checkpointed_photos_and_resume_embeds_only_the_rest(
    tmp_path, monkeypatch, capsys
):
    """Issue 27 item 13: with the default 10,000-row shards a 1,000-row catalog is one chunk; an interrupt at 60%
    keeps the photos embedded up to the last checkpoint (CHECKPOINT_ROWS), the interrupt message says so, and
    the resumed run embeds only the rest and says how many rows came from the checkpoint."""
    import threading

    from prodfuse.extraction.chunks import CHECKPOINT_ROWS, kept_work
    from prodfuse.extraction.config import ExtractionStopped

    n = 1000
    (tmp_path / "img").mkdir()
    rows = ["product_id,image_path,title,label"]
    for i in range(n):
        Image.new("RGB", (8, 8), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"p{i},img/{i}.png,thing {i},{'abc'[i % 3]}")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("\n".join(rows) + "\n")
    out = tmp_path / "emb"
    argv = ["--catalog", str(catalog), "--out", str(out), *FAST, "--views", "1", "--batch-size", "50"]

    real = image_encoders.iter_image_embeddings
    seen = {"paths": 0, "rows": 0}

    def counting(stop_after=None, stop=None):
        def wrapper(model, paths, *a, **k):
            seen["paths"] += len(paths)
            for item in real(model, paths, *a, **k):
                seen["rows"] += len(item[0])
                if stop_after is not None and seen["rows"] >= stop_after:
                    if stop is None:
                        raise KeyboardInterrupt  # what the CLI's signal handler raises on Ctrl-C
                    stop.set()
                yield item

        return wrapper

    # 1. the stop event at 600 of 1,000 rows: the pieces finished before it are kept
    stop = threading.Event()
    monkeypatch.setattr(image_encoders, "iter_image_embeddings", counting(600, stop))
    with pytest.raises(ExtractionStopped):
        extract.extract(config(*argv), stop)
    kept = 600 // CHECKPOINT_ROWS * CHECKPOINT_ROWS
    assert kept >= 500 and kept_work(out) == {"shards": 0, "shard_rows": 0, "checkpoint_rows": kept}

    # 2. Ctrl-C through the command line after 300 more rows: the message says what is kept
    seen.update(paths=0, rows=0)
    monkeypatch.setattr(image_encoders, "iter_image_embeddings", counting(300))
    assert main(["extract", *argv]) == 130
    kept2 = kept + 300 // CHECKPOINT_ROWS * CHECKPOINT_ROWS
    assert seen["paths"] <= n - kept  # nothing saved was embedded again
    assert f"0 complete shard(s) (0 rows) and the embedded photos of {kept2} more rows" in capsys.readouterr().err

    # 3. the resume embeds only the rest
    seen.update(paths=0, rows=0)
    monkeypatch.setattr(image_encoders, "iter_image_embeddings", counting())
    assert main(["extract", *argv]) == 0
    assert seen["paths"] == seen["rows"] == n - kept2
    assert f"the photos of {kept2} rows came from the interrupted run's checkpoint" in capsys.readouterr().out
    m = shards.read_manifest(out)
    assert m["summary"]["rows_from_checkpoint"] == kept2 and m["summary"]["embedded_rows"] == n
    assert not (out / ".work").exists()
    # the same shard as one uninterrupted run
    ref = tmp_path / "ref"
    extract.extract(config(*argv[:2], "--out", str(ref), *argv[4:]))
    a, b = shards.read_shards(ref), shards.read_shards(out)
    assert list(a["product_id"]) == list(b["product_id"]) == [f"p{i}" for i in range(n)]
    np.testing.assert_allclose(a["image_embedding"], b["image_embedding"], atol=1e-5)


def test_pieces_left_beside_a_merged_chunk_are_all_deleted_on_resume(tmp_path, monkeypatch):
    """A kill between saving a chunk from its checkpoint pieces and deleting them leaves both: the resume keeps the
    chunk and deletes every piece, so `.work/` is gone at the end."""
    from prodfuse.extraction.chunks import CHECKPOINT_ROWS, merge_pieces, save_chunk

    n = 2 * CHECKPOINT_ROWS + 10  # three pieces in one chunk
    (tmp_path / "img").mkdir()
    rows = ["product_id,image_path,title,label"]
    for i in range(n):
        Image.new("RGB", (8, 8), (i % 256, 40, 90)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"p{i},img/{i}.png,thing {i},{'abc'[i % 3]}")
    (tmp_path / "catalog.csv").write_text("\n".join(rows) + "\n")
    argv = ["--catalog", str(tmp_path / "catalog.csv"), "--out", str(tmp_path / "emb"), *FAST, "--views", "1"]

    def merged_then_killed(path, pieces):
        import numpy as np

        parts = [np.load(p) for p in pieces]
        save_chunk(path, np.concatenate([z["index"] for z in parts]), np.concatenate([z["emb"] for z in parts]), [])
        raise KeyboardInterrupt  # before the pieces are deleted

    monkeypatch.setattr(extract, "merge_pieces", merged_then_killed)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(config(*argv))
    work = tmp_path / "emb" / ".work"
    assert len(list(work.glob("rows-*.npz"))) == 3 and len(list(work.glob("images-*.npz"))) == 1

    monkeypatch.setattr(extract, "merge_pieces", merge_pieces)
    extract.extract(config(*argv))
    assert not work.exists()
    assert shards.read_manifest(tmp_path / "emb")["rows"] == n
