import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prodfuse.data import catalog, shards


def header(**settings):
    return {
        "catalog_path": "c.csv",
        "catalog_sha256": "abc",
        "columns": {"id": "product_id"},
        "settings": {"backbone": "mobilenet_v2", "image_size": 224, **settings},
        "encoders": {"image": {"dim": 8}, "text": {"dim": 4}},
        "versions": {"prodfuse": "0"},
    }


def chunk(start, n, rng):
    return {
        "product_id": [f"id{start + i}" for i in range(n)],
        "label": [f"c{(start + i) % 3}" for i in range(n)],
        "image_embedding": rng.normal(size=(n, 8)).astype(np.float32),
        "text_embedding": rng.normal(size=(n, 4)).astype(np.float32),
        "has_text": np.arange(n) % 2 == 0,
        "text": [f"t {start + i}" for i in range(n)],
        "ocr_text": ["" for _ in range(n)],
        "tokens": rng.integers(0, 15001, size=(n, 60)).astype(np.int32),
    }


def write_all(folder, chunks, overwrite=False, stop_after=None):
    m = shards.open_shards(folder, header(), overwrite=overwrite)
    start = shards.next_input_row(m)
    for k, c in enumerate(chunks):
        if sum(len(x["product_id"]) for x in chunks[:k]) < start:
            continue
        n = len(c["product_id"])
        first = int(c["product_id"][0][2:])
        shards.write_shard(
            folder, m, c, first, first + n, rejects=[{"id": "bad", "path": "p", "reason": "x"}] if k == 1 else []
        )
        if stop_after is not None and k + 1 == stop_after:
            return m
    shards.finish(folder, m)
    return m


def test_round_trip_values_dtypes_order(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [chunk(0, 5, rng), chunk(5, 5, rng), chunk(10, 3, rng)]
    write_all(tmp_path, chunks)
    got = shards.read_shards(tmp_path)
    assert list(got["product_id"]) == [f"id{i}" for i in range(13)]
    np.testing.assert_array_equal(got["image_embedding"], np.concatenate([c["image_embedding"] for c in chunks]))
    assert got["image_embedding"].dtype == np.float32 and got["image_embedding"].shape == (13, 8)
    assert got["text_embedding"].shape == (13, 4)
    assert got["tokens"].dtype == np.int32 and got["tokens"].shape == (13, 60)
    np.testing.assert_array_equal(got["tokens"], np.concatenate([c["tokens"] for c in chunks]))
    assert got["has_text"].dtype == bool
    # the parquet types are the documented ones
    schema = pq.read_schema(tmp_path / "part-00000.parquet")
    t = schema.field("image_embedding").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == 8 and t.value_type == pa.float32()
    t = schema.field("tokens").type
    assert pa.types.is_list(t) and t.value_type == pa.int32()
    # non-null embedding columns: parquet then skips per-value definition levels (the reader's speed relies on it)
    for name in ("image_embedding", "text_embedding", "tokens"):
        assert not schema.field(name).nullable and not schema.field(name).type.value_field.nullable
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["complete"] and m["rows"] == 13 and m["rejected"] == 1
    assert [s["rows"] for s in m["shards"]] == [5, 5, 3]
    assert (tmp_path / "rejects.csv").read_text().splitlines()[1].startswith("bad,p,x")


def test_column_and_row_subsets(tmp_path):
    rng = np.random.default_rng(1)
    chunks = [chunk(0, 5, rng), chunk(5, 5, rng)]
    write_all(tmp_path, chunks)
    full = shards.read_shards(tmp_path)
    got = shards.read_shards(tmp_path, columns=["image_embedding", "product_id"], rows=[7, 2, 9])
    assert set(got) == {"image_embedding", "product_id"}
    assert list(got["product_id"]) == ["id7", "id2", "id9"]
    np.testing.assert_array_equal(got["image_embedding"], full["image_embedding"][[7, 2, 9]])
    mask = np.zeros(10, bool)
    mask[[1, 8]] = True
    assert list(shards.read_shards(tmp_path, ["product_id"], rows=mask)["product_id"]) == ["id1", "id8"]
    with pytest.raises(ValueError, match="not in the shards"):
        shards.read_shards(tmp_path, columns=["nope"])
    with pytest.raises(ValueError, match=r"row positions must lie in \[0, 10\)"):
        shards.read_shards(tmp_path, rows=[10])


def test_many_shards_read_in_parallel_keep_catalog_order(tmp_path):
    rng = np.random.default_rng(2)
    chunks = [chunk(3 * k, 3, rng) for k in range(9)]
    write_all(tmp_path, chunks)
    got = shards.read_shards(tmp_path, rows=np.arange(26, -1, -2))
    assert list(got["product_id"]) == [f"id{i}" for i in range(26, -1, -2)]
    np.testing.assert_array_equal(
        got["image_embedding"], np.concatenate([c["image_embedding"] for c in chunks])[26::-2]
    )


def test_reads_shards_with_nullable_columns(tmp_path):
    """Shards written before the columns were declared non-null still read."""
    rng = np.random.default_rng(3)
    write_all(tmp_path, [chunk(0, 4, rng)])
    path = tmp_path / "part-00000.parquet"
    table = pq.read_table(path)

    def nullable(t):
        if pa.types.is_fixed_size_list(t):
            return pa.list_(t.value_type, t.list_size)
        return pa.list_(t.value_type) if pa.types.is_list(t) else t

    table = table.cast(pa.schema([pa.field(f.name, nullable(f.type), nullable=True) for f in table.schema]))
    assert pq.read_schema(path).field("tokens").type.value_field.nullable is False
    pq.write_table(table, path)
    assert pq.read_schema(path).field("image_embedding").type.value_field.nullable
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0].update(sha256=shards.file_sha256(path), bytes=path.stat().st_size)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    got = shards.read_shards(tmp_path, ["image_embedding", "tokens"])
    assert got["image_embedding"].shape == (4, 8) and got["tokens"].shape == (4, 60)


def test_resume_after_kill_between_shards(tmp_path):
    rng = np.random.default_rng(2)
    chunks = [chunk(0, 4, rng), chunk(4, 4, rng), chunk(8, 4, rng)]
    m = write_all(tmp_path, chunks, stop_after=1)  # "killed" after the first shard
    assert not m["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        shards.read_shards(tmp_path)
    # a kill mid-write leaves a temp file and maybe a renamed shard the manifest never recorded
    (tmp_path / "part-00001.parquet.tmp").write_bytes(b"half")
    (tmp_path / "part-00001.parquet").write_bytes(b"orphan")
    m2 = shards.open_shards(tmp_path, header())
    assert shards.next_input_row(m2) == 4
    assert not (tmp_path / "part-00001.parquet.tmp").exists() and not (tmp_path / "part-00001.parquet").exists()
    write_all(tmp_path, chunks)
    got = shards.read_shards(tmp_path)
    assert list(got["product_id"]) == [f"id{i}" for i in range(12)]  # nothing lost, nothing doubled
    np.testing.assert_array_equal(got["image_embedding"], np.concatenate([c["image_embedding"] for c in chunks]))


def test_settings_mismatch_names_the_setting(tmp_path):
    rng = np.random.default_rng(3)
    write_all(tmp_path, [chunk(0, 3, rng)])
    with pytest.raises(ValueError) as e:
        shards.open_shards(tmp_path, header(image_size=128))
    assert "settings.image_size: existing 224, requested 128" in str(e.value)
    assert "--overwrite" in str(e.value)
    m = shards.open_shards(tmp_path, header(image_size=128), overwrite=True)
    assert m["shards"] == [] and not list(tmp_path.glob("part-*"))


def test_overwrite_with_same_settings_resumes(tmp_path):
    rng = np.random.default_rng(5)
    write_all(tmp_path, [chunk(0, 3, rng), chunk(3, 3, rng)], stop_after=1)
    m = shards.open_shards(tmp_path, header(), overwrite=True)
    assert shards.next_input_row(m) == 3 and (tmp_path / "part-00000.parquet").is_file()


def test_hand_damaged_shard_is_detected(tmp_path):
    rng = np.random.default_rng(4)
    write_all(tmp_path, [chunk(0, 3, rng), chunk(3, 3, rng)], stop_after=2)
    with open(tmp_path / "part-00000.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="wrong size"):
        shards.open_shards(tmp_path, header())


def test_not_a_shard_folder(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        shards.read_shards(tmp_path)


def test_the_same_weights_at_another_path_are_the_same_setting():
    """A cache extracted where ../shared lay elsewhere (CI's checkout) stays valid: weights compare by content."""
    from prodfuse.data.shards import settings_difference

    def manifest(path, digest):
        image = {"backbone": "mobilenet_v2", "weights": path, "weights_sha256": digest}
        return {"settings": {"weights": path, "image": image, "views": 1}, "columns": {}, "encoders": {}}

    assert settings_difference(manifest("/a/w.h5", "abc"), manifest("/b/w.h5", "abc")) == []
    diff = settings_difference(manifest("/a/w.h5", "abc"), manifest("/b/w.h5", "def"))
    assert any(d.startswith("settings.image.weights_sha256") for d in diff) and any("/b/w.h5" in d for d in diff)


def _complete(tmp_path, n_shards=2):
    rng = np.random.default_rng(0)
    write_all(tmp_path, [chunk(10 * k, 10, rng) for k in range(n_shards)])
    return [tmp_path / shards.shard_name(k) for k in range(n_shards)]


def test_shard_changed_in_place_is_refused_naming_both_hashes(tmp_path):
    first, _ = _complete(tmp_path)
    expected = shards.read_manifest(tmp_path)["shards"][0]["sha256"]
    data = bytearray(first.read_bytes())
    data[200:210] = b"\x7f" * 10  # same size, other bytes (parquet would read them as other values)
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        shards.read_shards(tmp_path, ["image_embedding"])
    message = str(info.value)
    assert str(first) in message and expected in message and shards.file_sha256(first) in message


def test_swapped_shards_are_refused(tmp_path):
    first, second = _complete(tmp_path)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(ValueError, match="part-00000.parquet.*(does not match its manifest|bytes but the manifest)"):
        shards.read_shards(tmp_path, ["label"])


def test_truncated_shard_names_the_file(tmp_path):
    first, _ = _complete(tmp_path)
    first.write_bytes(first.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{first}.*truncated"):
        shards.read_shards(tmp_path, ["label"])


def test_verified_once_per_file_identity(tmp_path, monkeypatch):
    _complete(tmp_path)
    calls = []
    real = catalog.file_sha256
    monkeypatch.setattr(catalog, "file_sha256", lambda p: calls.append(p) or real(p))
    shards.read_shards(tmp_path, ["label"])
    shards.read_shards(tmp_path, ["image_embedding"], rows=[3, 15])
    assert len(calls) == 2  # two shards, hashed on the first read only


def test_non_finite_embeddings_are_refused_at_write_and_read(tmp_path):
    rng = np.random.default_rng(0)
    bad = chunk(0, 10, rng)
    bad["text_embedding"][4, 1] = np.inf
    m = shards.open_shards(tmp_path, header())
    with pytest.raises(ValueError, match="text_embedding holds non-finite.*first at row 4"):
        shards.write_shard(tmp_path, m, bad, 0, 10)
    # at read: a shard written by something else (its manifest hash matches, its values do not)
    bad["text_embedding"][4, 1] = 1.0
    shards.write_shard(tmp_path, m, bad, 0, 10)
    shards.finish(tmp_path, m)
    path = tmp_path / shards.shard_name(0)
    table = pq.read_table(path)
    values = np.asarray(table["image_embedding"].combine_chunks().values).copy()
    values[7] = np.nan
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values), 8)
    table = table.set_column(table.schema.get_field_index("image_embedding"), "image_embedding", arr)
    pq.write_table(table, path)
    m["shards"][0].update(bytes=path.stat().st_size, sha256=shards.file_sha256(path))
    shards.save_manifest(tmp_path, m)
    with pytest.raises(ValueError, match=f"image_embedding holds non-finite.*{path}"):
        shards.read_shards(tmp_path, ["image_embedding"])
