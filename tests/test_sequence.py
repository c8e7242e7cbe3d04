import platform

import numpy as np
import pytest

from prodfuse.data.sequence import ShardSequence, load_inputs
from synthetic import write_synthetic_shards


def arrays(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8)).astype(np.float32),
        "text": rng.normal(size=(n, 4)).astype(np.float32),
        "tokens": rng.integers(1, 100, size=(n, 60)).astype(np.int32),
    }, rng.integers(0, 3, size=n)


def test_batches_cover_rows_once_and_reshuffle():
    a, y = arrays()
    rows = np.arange(10, 60)
    seq = ShardSequence(a, y, 3, rows=rows, batch_size=16, training=True, seed=1)
    assert len(seq) == 4

    def epoch():
        seen = []
        for i in range(len(seq)):
            x, yy, w = seq[i]
            # recover row ids from the image vectors
            seen += [int(np.flatnonzero((a["image"] == r).all(1))[0]) for r in x["image"]]
            assert yy.shape == (len(x["image"]), 3) and np.allclose(yy.sum(1), 1)
        return seen

    first = epoch()
    assert sorted(first) == list(rows)  # every row once, no other rows
    seq.on_epoch_end()
    second = epoch()
    assert sorted(second) == list(rows) and second != first


def test_eval_sequence_keeps_order_and_unit_weights():
    a, y = arrays()
    seq = ShardSequence(a, y, 3, rows=np.arange(20), batch_size=8)
    x, yy, w = seq[1]
    np.testing.assert_array_equal(x["image"], a["image"][8:16])
    np.testing.assert_array_equal(yy.argmax(1), y[8:16])
    assert np.all(w == 1)


def test_class_weights_become_sample_weights():
    a, y = arrays()
    seq = ShardSequence(a, y, 3, batch_size=64, class_weight={0: 2.0, 1: 0.5, 2: 1.0})
    _, yy, w = seq[0]
    np.testing.assert_allclose(w, np.array([2.0, 0.5, 1.0])[y])


def test_mixup_mixes_image_and_labels_never_text():
    a, y = arrays()
    seq = ShardSequence(a, y, 3, batch_size=64, training=True, mixup=0.4, seed=3)
    rows = seq._order[:64].copy()
    x, yy, w = seq[0]
    np.testing.assert_array_equal(x["text"], a["text"][rows])  # text untouched
    np.testing.assert_array_equal(x["tokens"], a["tokens"][rows])
    assert not np.allclose(x["image"], a["image"][rows])  # image mixed
    assert (yy.max(1) < 0.999).any() and np.allclose(yy.sum(1), 1)  # soft labels
    assert np.array_equal(a["image"][rows], seq.arrays["image"][rows])  # stored arrays never modified


def test_modality_dropout_blanks_one_stream_per_item():
    a, y = arrays(n=4000)
    seq = ShardSequence(
        {"image": a["image"], "text": a["text"]}, y, 3, batch_size=4000, training=True, modality_dropout=0.3, seed=0
    )
    x, _, _ = seq[0]
    img_blank = ~x["image"].any(1)
    txt_blank = ~x["text"].any(1)
    assert not (img_blank & txt_blank).any()  # never both
    assert 0.25 < (img_blank | txt_blank).mean() < 0.35
    assert 0.4 < img_blank.sum() / max((img_blank | txt_blank).sum(), 1) < 0.6


def test_bad_options():
    a, y = arrays()
    with pytest.raises(ValueError, match="modality_dropout must be in"):
        ShardSequence(a, y, 3, modality_dropout=1.5)
    with pytest.raises(ValueError, match="mixup must be >= 0"):
        ShardSequence(a, y, 3, mixup=-1)


def test_load_inputs_reads_only_needed_columns(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 8)).astype(np.float32)
    txt = rng.normal(size=(30, 4)).astype(np.float32)
    write_synthetic_shards(tmp_path, img, txt, np.array(["a", "b", "c"] * 10), shard_rows=7)
    got = load_inputs(tmp_path, ["image"], ["label"])
    assert set(got) == {"image", "label"}
    np.testing.assert_array_equal(got["image"], img)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap setting exists only in glibc")
def test_freed_heap_is_kept_mapped_on_glibc(monkeypatch):
    from prodfuse import keep_freed_heap_mapped

    assert keep_freed_heap_mapped() is True
    monkeypatch.setenv("PRODFUSE_KEEP_MALLOC_DEFAULTS", "1")
    assert keep_freed_heap_mapped() is False


def test_training_draws_views_and_prediction_averages_them():
    from prodfuse.data.sequence import view_count, with_view
    from prodfuse.modeling.probabilities import predict_arrays

    n, d = 6, 4
    image = np.zeros((n, d), np.float32)
    views = np.stack([np.full((n, d), v, np.float32) for v in (1, 2)], axis=1).reshape(n, -1)  # view v == v
    arrays = {"image": image, "image_views": views, "text": np.ones((n, 3), np.float32)}
    assert view_count(arrays) == 3 and view_count({"image": image}) == 1
    assert with_view(arrays, 2)["image"][0, 0] == 2 and "image_views" not in with_view(arrays, 0)
    picked = with_view(arrays, np.array([0, 1, 2, 0, 1, 2]))["image"][:, 0]
    assert picked.tolist() == [0, 1, 2, 0, 1, 2]
    seq = ShardSequence(arrays, np.zeros(n, int), 2, batch_size=n, training=True, seed=0)
    drawn = set()
    for _ in range(5):
        x, _, _ = seq[0]
        assert set(x) == {"image", "text"}
        drawn |= set(x["image"][:, 0].tolist())
        seq.on_epoch_end()
    assert drawn == {0.0, 1.0, 2.0}
    x, _, _ = ShardSequence(arrays, np.zeros(n, int), 2, batch_size=n)[0]
    assert set(x["image"][:, 0].tolist()) == {0.0}  # validation: the whole photo only

    class Echo:  # "probability" of class 1 = the image value / 10: the mean over views is (0 + 1 + 2) / 30
        output_shape = (None, 2)

        def __call__(self, x, training=False):  # few rows: predict_arrays calls the model directly
            p1 = x["image"][:, :1] / 10
            return np.concatenate([1 - p1, p1], axis=1)

        def predict(self, x, batch_size=None, verbose=0):  # many rows: through model.predict
            return self(x)

    np.testing.assert_allclose(predict_arrays(Echo(), arrays)[:, 1], 0.1)
    np.testing.assert_allclose(predict_arrays(Echo(), arrays, batch_size=1)[:, 1], 0.1)  # view by view


def test_augmentation_draws_do_not_depend_on_call_order():
    n = 40
    arrays = {
        "image": np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32),
        "text": np.ones((n, 3), np.float32),
    }
    make = lambda: ShardSequence(
        arrays,
        np.zeros(n, int),
        2,
        batch_size=8,
        training=True,
        seed=3,  # noqa: E731
        modality_dropout=0.5,
        mixup=0.4,
    )
    a, b = make(), make()
    forward = [a[i][0] for i in range(len(a))]
    backward = [b[i][0] for i in reversed(range(len(b)))][::-1]
    b[2]  # Keras may ask for a batch again (or ahead): nothing after it changes
    for fa, fb in zip(forward, backward):
        assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    a.on_epoch_end()
    assert not np.array_equal(a[0][0]["image"], forward[0]["image"])  # a new epoch draws anew
