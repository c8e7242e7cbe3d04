import hashlib
import os
import struct
import time
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image, ImageFile

from prodfuse.encoders import image as ie

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MOBILENET_H5 = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
GROCERY_VAL = SHARED / "data" / "grocery" / "val.csv"
SIZE = 32


@pytest.fixture(scope="module")
def small_model():
    return ie.build_backbone("mobilenet_v2", weights="none", image_size=SIZE)


@pytest.fixture(scope="module")
def resnet_model():
    # Random MobileNetV2/EfficientNet embeddings shrink to ~1e-12; random ResNet50 ones stay O(1).
    return ie.build_backbone("resnet50", weights="none", image_size=SIZE)


def _assert_close(actual, expected, rtol=1e-4):
    """Relative comparison: random-init embeddings can be tiny, so a fixed atol would prove nothing."""
    expected = np.asarray(expected)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _pattern(width, height, seed=0):
    """Smooth, asymmetric RGB image so rotations and colour handling change the result."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx * yy) % 256], axis=-1)
    arr = arr.astype(np.int64) + rng.integers(-10, 10, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _png_header_only(path, width, height):
    """A PNG whose IHDR declares width x height but whose data is a few bytes: a decompression bomb."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _embed(model, arrays):
    return keras.ops.convert_to_numpy(model(np.stack(arrays).astype(np.float32), training=False))


# ---------------------------------------------------------------------------------------------- backbones


def test_backbone_dim_and_unknown_name():
    assert ie.backbone_dim("resnet50") == 2048
    assert ie.backbone_dim("mobilenet_v2") == 1280
    assert ie.backbone_dim("efficientnet_b0") == 1280
    with pytest.raises(ValueError, match="vgg16.*efficientnet_b0.*mobilenet_v2.*resnet50"):
        ie.backbone_dim("vgg16")


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0"])
def test_each_backbone_embeds_raw_pixels_with_its_own_preprocessing(name, request):
    if name == "resnet50":
        model = request.getfixturevalue("resnet_model")
    else:
        model = ie.build_backbone(name, weights="none", image_size=SIZE)
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (3, SIZE, SIZE, 3)).astype(np.float32)
    emb = keras.ops.convert_to_numpy(model(raw, training=False))
    assert emb.shape == (3, ie.backbone_dim(name)) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    # Preprocessing lives inside: the inner backbone on preprocess_input(raw) gives the same numbers.
    module = getattr(keras.applications, ie.BACKBONES[name][2])
    expected_input = module.preprocess_input(raw.copy())
    preprocessed = keras.ops.convert_to_numpy(model.get_layer("preprocess")(raw))
    np.testing.assert_allclose(preprocessed, expected_input, atol=1e-4)
    if name != "efficientnet_b0":  # EfficientNet rescales inside its own graph; its preprocess_input is identity
        assert np.abs(preprocessed - raw).max() > 50
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)][0]
    _assert_close(emb, keras.ops.convert_to_numpy(inner(expected_input, training=False)))


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="bfloat"):
        ie.build_backbone("mobilenet_v2", weights="none", image_size=SIZE, precision="bfloat")
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(ValueError, match="nope.weights.h5"):
        ie.build_backbone("mobilenet_v2", weights=str(missing), image_size=SIZE)


def test_mixed_precision_casts_output_and_matches_float32(resnet_model):
    mixed = ie.build_backbone("resnet50", weights="none", image_size=SIZE, precision="mixed_float16")
    assert keras.config.dtype_policy().name == "float32"  # global policy restored
    inner = [layer for layer in mixed.layers if isinstance(layer, keras.Model)][0]
    assert inner.layers[-1].compute_dtype == "float16"
    mixed.set_weights(resnet_model.get_weights())
    raw = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32)
    out = mixed(raw, training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    ref = keras.ops.convert_to_numpy(resnet_model(raw, training=False))
    assert np.abs(ref).mean() > 0.1
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), ref, atol=0.02 * np.abs(ref).max())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Skipping nested container:UserWarning")
def test_saved_model_reloads_with_plain_load_model(small_model, tmp_path):
    path = tmp_path / "m.keras"
    small_model.save(path)
    loaded = keras.models.load_model(path)
    raw = np.random.default_rng(3).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32)
    _assert_close(keras.ops.convert_to_numpy(loaded(raw)), keras.ops.convert_to_numpy(small_model(raw)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Skipping nested container:UserWarning")
def test_local_weights_file_roundtrip_and_mismatch(small_model, tmp_path):
    inner = [layer for layer in small_model.layers if isinstance(layer, keras.Model)][0]
    path = tmp_path / "mnv2_random.weights.h5"
    inner.save_weights(path)
    rebuilt = ie.build_backbone("mobilenet_v2", weights=str(path), image_size=SIZE)
    raw = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32)
    _assert_close(keras.ops.convert_to_numpy(rebuilt(raw)), keras.ops.convert_to_numpy(small_model(raw)))
    settings = ie.image_settings("mobilenet_v2", str(path), SIZE, "float32")
    assert settings["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert settings["weights"] == str(path.resolve()) and settings["dim"] == 1280
    assert ie.image_settings("resnet50", "none", 64, "float32")["weights"] == "none"
    assert ie.image_settings("resnet50", "imagenet", 64, "float32")["weights_sha256"] is None
    with pytest.raises(ValueError, match="mnv2_random.weights.h5.*does not fit.*resnet50"):
        ie.build_backbone("resnet50", weights=str(path), image_size=SIZE)


def _offline_constructor(real):
    def constructor(*args, **kwargs):
        if kwargs.get("weights") == "imagenet":
            # What keras.utils.get_file raises when the download host cannot be reached.
            raise Exception(
                "URL fetch failure on https://storage.googleapis.com/tensorflow/keras-applications/"
                "mobilenet_v2/x.h5: None -- [Errno -3] Temporary failure in name resolution"
            )
        return real(*args, **kwargs)

    return constructor


def test_imagenet_without_network_names_the_remedies(monkeypatch):
    monkeypatch.setattr(keras.applications, "MobileNetV2", _offline_constructor(keras.applications.MobileNetV2))
    with pytest.raises(ValueError, match="--weights PATH.*--weights none"):
        ie.build_backbone("mobilenet_v2", weights="imagenet", image_size=SIZE)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
def test_imagenet_download_failure_through_real_keras_code(monkeypatch):
    from keras.src.utils import file_utils

    def offline_get_file(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/x.h5: None -- offline")

    monkeypatch.setattr(file_utils, "get_file", offline_get_file)
    with pytest.raises(ValueError, match="--weights"):
        ie.build_backbone("mobilenet_v2", weights="imagenet", image_size=SIZE)


def test_random_fallback_warns_once_and_is_recorded(monkeypatch, caplog):
    monkeypatch.setattr(keras.applications, "MobileNetV2", _offline_constructor(keras.applications.MobileNetV2))
    with caplog.at_level("WARNING", logger="prodfuse"):
        model = ie.build_backbone("mobilenet_v2", weights="imagenet", image_size=SIZE, allow_random_fallback=True)
    assert [r.levelname for r in caplog.records if "RANDOM weights" in r.getMessage()] == ["WARNING"]  # once
    assert model.weights_source == ie.RANDOM_FALLBACK  # what the manifest records, not "imagenet"
    assert model(np.zeros((1, SIZE, SIZE, 3), np.float32)).shape == (1, 1280)


@pytest.mark.skipif(not MOBILENET_H5.exists(), reason="shared MobileNetV2 weights not available")
def test_mobilenet_v2_shared_weights_match_direct_keras_application():
    model = ie.build_backbone("mobilenet_v2", weights=str(MOBILENET_H5), image_size=224)
    if GROCERY_VAL.exists():
        root = GROCERY_VAL.parent
        rels = [line.split(",")[1] for line in GROCERY_VAL.read_text().splitlines()[1:3]]
        images = [ie.load_image(root / rel, 224) for rel in rels]
    else:
        images = [np.asarray(_pattern(224, 224, seed)) for seed in (0, 1)]
    x = np.stack(images).astype(np.float32)
    ours = keras.ops.convert_to_numpy(model(x, training=False))
    direct_model = keras.applications.MobileNetV2(
        include_top=False, pooling="avg", weights=str(MOBILENET_H5), input_shape=(224, 224, 3)
    )
    direct = keras.ops.convert_to_numpy(
        direct_model(keras.applications.mobilenet_v2.preprocess_input(x.copy()), training=False)
    )
    np.testing.assert_allclose(ours, direct, atol=1e-5)
    assert np.abs(ours).max() > 0.1  # real, non-degenerate features


# ---------------------------------------------------------------------------------------------- loading


def test_modes_become_rgb_with_transparency_on_white(tmp_path):
    grey = Image.new("L", (40, 30), 100)
    grey.save(tmp_path / "l.png")
    Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (40, 30), (0, 255)).save(tmp_path / "la.png")
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(tmp_path / "i16.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pal.save(tmp_path / "p_transparent.png", transparency=1)  # every pixel uses the transparent index
    pal.save(tmp_path / "p_opaque.png")
    expected = {
        "l.png": (100, 100, 100),
        "cmyk.jpg": (255, 255, 255),
        "rgba.png": (255, 255, 255),
        "la.png": (0, 0, 0),
        "i16.png": (255, 255, 255),
        "p_transparent.png": (255, 255, 255),
        "p_opaque.png": (255, 0, 0),
    }
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    for name, colour in expected.items():
        arr = ie.load_image(tmp_path / name, SIZE)
        assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8, name
        np.testing.assert_allclose(arr.reshape(-1, 3).mean(0), colour, atol=2, err_msg=name)


def test_whole_image_is_resized_without_crop(tmp_path):
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 50))  # a white strip at the far left survives: no centre crop
    img.save(tmp_path / "wide.png")
    arr = ie.load_image(tmp_path / "wide.png", SIZE)
    assert arr[:, 0].min() > 200 and arr[:, -1].max() < 5


def test_big_jpeg_draft_decoding_matches_full_decode(tmp_path):
    _pattern(1200, 900).save(tmp_path / "big.jpg", quality=92)
    fast = ie.load_image(tmp_path / "big.jpg", 64).astype(np.float32)
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(fast - full).mean() < 3.0


def test_exif_orientation_is_applied(tmp_path, small_model):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _pattern(64, 48).save(tmp_path / "oriented.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "oriented.jpg") as raw:
        raw.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "rotated.png")
        raw.save(tmp_path / "unrotated.png")
    oriented = ie.load_image(tmp_path / "oriented.jpg", SIZE)
    rotated = ie.load_image(tmp_path / "rotated.png", SIZE)
    unrotated = ie.load_image(tmp_path / "unrotated.png", SIZE)
    np.testing.assert_array_equal(oriented, rotated)
    assert np.abs(oriented.astype(int) - unrotated).mean() > 20
    emb, ok, rejects = ie.embed_images(small_model, [tmp_path / "oriented.jpg"], SIZE, progress=False)
    assert rejects == [] and list(ok) == [0]
    _assert_close(emb, _embed(small_model, [rotated]))
    assert np.abs(emb - _embed(small_model, [unrotated])).max() > 1e-2 * np.abs(emb).max()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_header_is_rejected_before_decoding(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # over 2x PIL's own limit
    _png_header_only(tmp_path / "big.png", 10_000, 10_000)  # over max_pixels, under PIL's hard limit
    for name in ("bomb.png", "big.png"):
        start = time.perf_counter()
        with pytest.raises(ie.ImageRejected) as info:
            ie.load_image(tmp_path / name, SIZE)
        assert info.value.reason == "too_many_pixels", name
        assert time.perf_counter() - start < 0.5  # nothing decoded or allocated


def test_truncated_jpeg_is_rejected_even_if_pil_was_told_to_accept_it(tmp_path, monkeypatch):
    _pattern(64, 48).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ie.ImageRejected) as info:
        ie.load_image(tmp_path / "half.jpg", SIZE)
    assert info.value.reason == "truncated_image" and isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"])  # MPO: a camera's JPEG
def test_allowed_formats_decode(tmp_path, fmt):
    _pattern(40, 30).save(tmp_path / "photo", format=fmt)
    assert ie.load_image(tmp_path / "photo", SIZE).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("fmt", ["EPS", "AVIF", "ICO", "PPM", "TGA", "QOI", "PCX"])
def test_other_formats_are_refused_by_name_before_decoding(tmp_path, fmt, monkeypatch):
    """Only the allowed formats' readers parse the file; another format is named from its first bytes where PIL
    can tell it (TGA has no signature of its own: its first bytes may match CUR's, or nothing)."""
    try:
        _pattern(40, 30).save(tmp_path / "photo", format=fmt)
    except (KeyError, OSError) as e:  # this Pillow build cannot write it
        pytest.skip(f"Pillow cannot write {fmt}: {e}")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.format))
    with pytest.raises(ie.ImageRejected) as info:
        ie.load_image(tmp_path / "photo", SIZE)
    assert decoded == []
    if fmt == "TGA":
        assert info.value.reason in ("unsupported_format", "not_an_image")
        return
    assert info.value.reason == "unsupported_format", info.value
    assert fmt in info.value.detail and "JPEG, PNG, WEBP, GIF, BMP, TIFF" in info.value.detail


def test_any_decoder_error_is_a_rejection(tmp_path, monkeypatch):
    """A corrupt file can fail inside a decoder with any error (Pillow's AVIF plugin raises RuntimeError): it is a
    rejected image, never an exception that escapes load_image."""
    _pattern(40, 30).save(tmp_path / "photo.png")

    def corrupt(self):
        raise RuntimeError("Failed to decode image: corrupt data")

    monkeypatch.setattr(Image.Image, "load", corrupt)
    with pytest.raises(ie.ImageRejected) as info:
        ie.load_image(tmp_path / "photo.png", SIZE)
    assert info.value.reason == "not_an_image" and "RuntimeError" in info.value.detail


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of mode")
def test_permission_denied_is_unreadable(tmp_path):
    _pattern(40, 30).save(tmp_path / "locked.png")
    os.chmod(tmp_path / "locked.png", 0)
    with pytest.raises(ie.ImageRejected) as info:
        ie.load_image(tmp_path / "locked.png", SIZE)
    assert info.value.reason == "unreadable_file"


def test_batch_keeps_good_rows_and_labels_every_bad_one(tmp_path, small_model):
    _pattern(50, 40, 1).convert("L").save(tmp_path / "grey.png")
    _pattern(50, 40, 2).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    _pattern(50, 40, 3).convert("P").save(tmp_path / "pal.png")
    _pattern(50, 40, 4).convert("RGBA").save(tmp_path / "rgba.png")
    _pattern(64, 48, 5).save(tmp_path / "photo.jpg", quality=95)
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    _png_header_only(tmp_path / "bomb.png", 5_000, 5_000)
    (tmp_path / "a_directory.jpg").mkdir()
    paths = [
        tmp_path / "grey.png",  # 0
        tmp_path / "missing.jpg",  # 1
        tmp_path / "empty.jpg",  # 2
        tmp_path / "cmyk.jpg",  # 3
        tmp_path / "half.jpg",  # 4
        tmp_path / "notes.jpg",  # 5
        tmp_path / "pal.png",  # 6
        tmp_path / "bomb.png",  # 7
        tmp_path / "rgba.png",  # 8
        tmp_path / "a_directory.jpg",  # 9
        tmp_path / "photo.jpg",  # 10
    ]
    expected_rejects = {
        1: "missing_file",
        2: "empty_file",
        4: "truncated_image",
        5: "not_an_image",
        7: "too_many_pixels",
        9: "unreadable_file",
    }
    batches = list(
        ie.iter_image_embeddings(
            small_model, paths, SIZE, batch_size=4, workers=3, progress=False, max_pixels=1_000_000
        )
    )
    assert len(batches) == 3
    for number, (idx, emb, rejects) in enumerate(batches):
        window = set(range(number * 4, number * 4 + 4))
        assert set(idx) | {r[0] for r in rejects} == window & set(range(len(paths)))
        assert emb.shape == (len(idx), 1280) and emb.dtype == np.float32
        assert list(idx) == sorted(idx)
    rejects = [r for batch in batches for r in batch[2]]
    assert {index: reason for index, reason, _ in rejects} == expected_rejects
    assert all(isinstance(detail, str) and detail for _, _, detail in rejects)

    emb, ok, rejects2 = ie.embed_images(small_model, paths, SIZE, batch_size=4, progress=False, max_pixels=1_000_000)
    good_rows = [i for i in range(len(paths)) if i not in expected_rejects]
    assert list(ok) == good_rows and sorted(rejects2) == sorted(rejects)
    expected = _embed(small_model, [ie.load_image(paths[i], SIZE) for i in good_rows])
    _assert_close(emb, expected)
    # Rows differ from one another by far more than the tolerance, so a misaligned row would fail.
    assert np.abs(emb[1:] - emb[:-1]).max(axis=1).min() > 1e-2 * np.abs(emb).max()


def test_all_rejected_batch_and_empty_input(small_model, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="prodfuse.progress")
    batches = list(ie.iter_image_embeddings(small_model, [tmp_path / "x.jpg"], SIZE, batch_size=2, progress=True))
    assert len(batches) == 1
    idx, emb, rejects = batches[0]
    assert idx.shape == (0,) and emb.shape == (0, 1280) and rejects[0][:2] == (0, "missing_file")
    # stderr is not a terminal here: progress is a plain log line, not a bar with escape codes
    assert "images: 1/1 img" in caplog.text
    emb, ok, rejects = ie.embed_images(small_model, [], SIZE, progress=False)
    assert emb.shape == (0, 1280) and ok.shape == (0,) and rejects == []


def test_views_are_the_whole_photo_then_corner_and_centre_crops(tmp_path):
    img = _pattern(40, 50)
    img.save(tmp_path / "p.png")
    views = ie.load_image(tmp_path / "p.png", 20, views=6)
    assert views.shape == (6, 20, 20, 3) and views.dtype == np.uint8
    assert np.array_equal(views[0], ie.load_image(tmp_path / "p.png", 20))  # view 0 is the plain whole photo
    top_left = np.asarray(img.crop((0, 0, 24, 30)).resize((20, 20), Image.Resampling.BILINEAR)).astype(int)
    assert ie.CROP_SCALE == 0.6
    assert np.abs(views[1] - top_left).mean() < 2  # 60% of each side, from the top-left corner
    assert len({v.tobytes() for v in views}) == 6  # five different crops
    assert ie.load_image(tmp_path / "p.png", 20, views=2).shape == (2, 20, 20, 3)
    # extraction's --crop-scale 0.8
    larger = ie.load_image(tmp_path / "p.png", 20, views=2, crop_scale=0.8)
    top_left = np.asarray(img.crop((0, 0, 32, 40)).resize((20, 20), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(larger[1] - top_left).mean() < 2
    with pytest.raises(ValueError, match="views must be an int in 1..6"):
        ie.load_image(tmp_path / "p.png", 20, views=7)
    with pytest.raises(ValueError, match="crop_scale must be in \\(0, 1\\]; got 1.5"):
        ie.load_image(tmp_path / "p.png", 20, views=2, crop_scale=1.5)


def test_views_embed_per_photo_in_one_batch(tmp_path, resnet_model):
    paths = []
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    size = resnet_model.input_shape[1]
    emb, idx, rejects = ie.embed_images(resnet_model, paths, size, views=3, progress=False, batch_size=4)
    plain, _, _ = ie.embed_images(resnet_model, paths, size, progress=False)
    assert emb.shape == (3, 3, resnet_model.output_shape[-1]) and idx.tolist() == [0, 1, 2] and not rejects
    _assert_close(emb[:, 0], plain)  # view 0 is what extraction without views gives
