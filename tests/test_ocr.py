"""Tests for prodfuse.encoders.ocr: filter rules, parsers, languages, cache, error handling, real engines."""

import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from prodfuse.encoders import ocr
from prodfuse.encoders.ocr import (
    OcrResult,
    filter_words,
    iter_ocr,
    ocr_images,
    ocr_settings,
    parse_easyocr,
    parse_rapidocr,
    parse_tesseract,
    resolve_langs,
)

HAS_RAPIDOCR = importlib.util.find_spec("rapidocr") is not None
HAS_TESSERACT = importlib.util.find_spec("pytesseract") is not None and shutil.which("tesseract") is not None


def _font(size):
    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf")) if Path("/usr/share/fonts").exists() else []
    bold = [f for f in fonts if "Sans-Bold." in f.name] or fonts
    if bold:
        return ImageFont.truetype(str(bold[0]), size)
    return ImageFont.load_default(size=size)


def _text_image(path, text, size=(320, 120), font_size=48):
    # Small images keep the engines fast (RapidOCR scales the short side to 736 px).
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).multiline_text((20, 30), text, fill="black", font=_font(font_size))
    img.save(path)
    return str(path)


@pytest.fixture
def fake_engine(monkeypatch):
    """Replace engine construction by a fake that reads the words from the image's file name."""
    calls = []

    def make(engine, langs):
        def read(path):
            calls.append(path)
            Image.open(path).verify()  # corrupt files fail like a real engine would
            return [(Path(path).stem.replace("_", " "), 0.9)]

        return read

    monkeypatch.setattr(ocr, "_make_engine", make)
    monkeypatch.setattr(ocr, "_LOCAL_ENGINES", {})
    monkeypatch.setattr(ocr, "_check_engine", lambda engine: None)
    return calls


# ----------------------------------------------------------------- filter rules


def test_filter_confidence_must_exceed_threshold():
    words = [("kept", 0.51), ("edge", 0.5), ("low", 0.1)]
    assert filter_words(words) == "kept"
    assert filter_words(words, min_conf=0.05) == "kept edge low"


def test_filter_length_after_punctuation_strip():
    assert filter_words([("a ab x. 7 42", 0.9)]) == "ab 42"
    assert filter_words([("ab abc", 0.9)], min_len=3) == "abc"


def test_filter_dedupe_case_insensitive_keeps_first_and_order():
    words = [("Soya ALPRO", 0.9), ("alpro drink", 0.8), ("SOYA", 0.95), ("Drink milk", 0.7)]
    assert filter_words(words) == "Soya ALPRO drink milk"


def test_filter_strips_leading_trailing_punctuation_only():
    words = [('"Alpro," (SOYA)® coca-cola 1.5L ...', 0.9), ("豆奶，", 0.9)]
    assert filter_words(words) == "Alpro SOYA coca-cola 1.5L 豆奶"


def test_filter_splits_lines_into_words_with_line_confidence():
    assert filter_words([("Oat  Drink\tBarista", 0.8), ("Blurry Line", 0.3)]) == "Oat Drink Barista"


def test_filter_empty():
    assert filter_words([]) == ""
    assert filter_words([("x", 0.99), ("word", 0.2), ("!!", 0.99)]) == ""


# ----------------------------------------------------------------- parsers


def test_parse_rapidocr_tuple_list_and_none():
    box = [[10.0, 10.0], [90.0, 10.0], [90.0, 40.0], [10.0, 40.0]]
    result = [[box, "ALPRO", 0.98], [box, "SOYA", 0.71]]
    expected = [("ALPRO", 0.98), ("SOYA", 0.71)]
    assert parse_rapidocr((result, [0.2, 0.0, 0.05])) == expected
    assert parse_rapidocr(result) == expected
    assert parse_rapidocr((None, None)) == []
    assert parse_rapidocr(None) == []


def test_parse_rapidocr_3_output():
    from types import SimpleNamespace

    assert parse_rapidocr(SimpleNamespace(txts=("MJÖLK", "Vanilj"), scores=(0.93, 0.61))) == [
        ("MJÖLK", 0.93),
        ("Vanilj", 0.61),
    ]
    assert parse_rapidocr(SimpleNamespace(txts=None, scores=None)) == []  # no text found


def test_parse_tesseract_drops_non_words_and_scales_conf():
    data = {
        "level": [1, 2, 3, 4, 5, 5, 5],
        "text": ["", "", "", "", "ALPRO", " ", "SOYA"],
        "conf": [-1, -1, "-1", -1, 91, 40, "96.5"],
    }
    assert parse_tesseract(data) == [("ALPRO", 0.91), ("SOYA", 0.965)]
    assert parse_tesseract({"text": [], "conf": []}) == []


# A readtext() result as easyocr 1.7 returns it (numpy ints in boxes, numpy float confidences).
EASYOCR_READTEXT = [
    (
        [
            [np.int32(52), np.int32(31)],
            [np.int32(289), np.int32(31)],
            [np.int32(289), np.int32(97)],
            [np.int32(52), np.int32(97)],
        ],
        "ALPRO",
        np.float64(0.9991637468338013),
    ),
    (
        [
            [np.int32(60), np.int32(110)],
            [np.int32(270), np.int32(110)],
            [np.int32(270), np.int32(150)],
            [np.int32(60), np.int32(150)],
        ],
        "Soya Original",
        np.float64(0.8712234305120522),
    ),
    (
        [
            [np.int32(61), np.int32(160)],
            [np.int32(120), np.int32(160)],
            [np.int32(120), np.int32(181)],
            [np.int32(61), np.int32(181)],
        ],
        "1L",
        np.float64(0.3120948337436543),
    ),
    (
        [
            [np.int32(200), np.int32(160)],
            [np.int32(280), np.int32(160)],
            [np.int32(280), np.int32(181)],
            [np.int32(200), np.int32(181)],
        ],
        "alpro.",
        np.float64(0.6643219871520996),
    ),
    (
        [
            [np.int32(20), np.int32(5)],
            [np.int32(40), np.int32(5)],
            [np.int32(40), np.int32(20)],
            [np.int32(20), np.int32(20)],
        ],
        "豆奶",
        np.float64(0.9411764740943909),
    ),
]


def test_parse_easyocr_recorded_output_and_filter():
    parsed = parse_easyocr(EASYOCR_READTEXT)
    assert [t for t, _ in parsed] == ["ALPRO", "Soya Original", "1L", "alpro.", "豆奶"]
    assert all(type(c) is float for _, c in parsed)
    assert parsed[0][1] == pytest.approx(0.99916, abs=1e-5)
    assert filter_words(parsed) == "ALPRO Soya Original 豆奶"


# ----------------------------------------------------------------- settings


def test_resolve_langs_defaults_and_normalisation():
    assert resolve_langs("rapidocr", None) == ("multi",)
    assert resolve_langs("rapidocr", " Multi") == ("multi",)
    assert resolve_langs("tesseract", None) == ("eng",)
    assert resolve_langs("tesseract", "eng,deu,eng") == ("eng", "deu")
    assert resolve_langs("easyocr", "") == ("ch_sim", "en")
    assert resolve_langs("easyocr", "EN,fr") == ("en", "fr")
    assert resolve_langs("none", "anything") == ()


def test_resolve_langs_errors():
    with pytest.raises(ValueError, match="'paddle'"):
        resolve_langs("paddle", None)
    with pytest.raises(ValueError, match="rapidocr.*'fr'"):
        resolve_langs("rapidocr", "fr")
    with pytest.raises(ValueError, match="rapidocr.*'ch,en'.*omit --ocr-lang"):
        resolve_langs("rapidocr", "ch,en")  # PP-OCRv4's languages: the built-in v6 models are multilingual
    with pytest.raises(ValueError, match="'en;fr'"):
        resolve_langs("tesseract", "en;fr")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRODFUSE_CACHE", str(tmp_path / "root"))
    assert ocr.default_cache_dir() == tmp_path / "root" / "ocr"
    monkeypatch.delenv("PRODFUSE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ocr.default_cache_dir() == tmp_path / "home" / ".cache" / "prodfuse" / "ocr"


def test_ocr_settings_records_filter_and_version():
    s = ocr_settings("rapidocr", None)
    assert s["engine"] == "rapidocr" and s["langs"] == ["multi"]
    assert (s["min_conf"], s["min_len"]) == (0.5, 2)
    assert s["models"] == ["PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx"]
    if HAS_RAPIDOCR:
        assert s["version"].startswith("3.")
    assert ocr_settings("none", None)["version"] is None


# ----------------------------------------------------------------- cache and errors


def test_cache_hit_runs_no_engine(fake_engine, tmp_path):
    paths = [_text_image(tmp_path / f"{name}.png", name) for name in ("alpro_soya", "oat_drink")]
    cache = tmp_path / "cache"

    first = ocr_images(paths, engine="tesseract", workers=1, cache_dir=cache, progress=False)
    assert first == [OcrResult("alpro soya", False, None), OcrResult("oat drink", False, None)]
    assert len(fake_engine) == 2
    assert len(list(cache.rglob("*.json"))) == 2
    assert not list(cache.rglob(".tmp-*"))  # atomic write left no temp file

    second = ocr_images(paths, engine="tesseract", workers=1, cache_dir=cache, progress=False)
    assert second == [OcrResult("alpro soya", True, None), OcrResult("oat drink", True, None)]
    assert len(fake_engine) == 2  # no engine call on a hit

    # Other languages are another cache entry; so is a changed image file.
    ocr_images(paths[:1], engine="tesseract", langs="deu", workers=1, cache_dir=cache, progress=False)
    assert len(fake_engine) == 3
    _text_image(paths[1], "changed")
    third = ocr_images(paths, engine="tesseract", workers=1, cache_dir=cache, progress=False)
    assert [r.cached for r in third] == [True, False]
    assert len(fake_engine) == 4


def test_identical_images_in_one_batch_are_read_once(fake_engine, tmp_path):
    first = _text_image(tmp_path / "alpro.png", "x")
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(first).read_bytes())
    other = _text_image(tmp_path / "oat.png", "y")
    res = ocr_images([first, other, str(copy)], engine="tesseract", workers=1, cache_dir=tmp_path / "c", progress=False)
    assert [r.text for r in res] == ["alpro", "oat", "alpro"]  # same bytes -> first file's reading
    assert len(fake_engine) == 2


def test_corrupt_cache_file_is_a_miss(fake_engine, tmp_path):
    path = _text_image(tmp_path / "alpro.png", "x")
    cache = tmp_path / "cache"
    ocr_images([path], engine="tesseract", workers=0, cache_dir=cache, progress=False)
    (entry,) = cache.rglob("*.json")
    entry.write_text("{half")
    (res,) = ocr_images([path], engine="tesseract", workers=0, cache_dir=cache, progress=False)
    assert res == OcrResult("alpro", False, None)
    assert len(fake_engine) == 2


def test_bad_images_give_empty_text_and_error(fake_engine, tmp_path):
    good = _text_image(tmp_path / "alpro.png", "x")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    missing = str(tmp_path / "missing.jpg")
    cache = tmp_path / "cache"
    seen = []

    res = ocr_images(
        [missing, str(corrupt), good],
        engine="tesseract",
        workers=1,
        cache_dir=cache,
        progress=False,
        on_result=lambda i, r: seen.append(i),
    )
    assert res[0].text == "" and "missing.jpg" in res[0].error and not res[0].cached
    assert res[1].text == "" and res[1].error and not res[1].cached
    assert res[2] == OcrResult("alpro", False, None)
    assert sorted(seen) == [0, 1, 2]
    # Errors are not cached: the broken file is tried again next time.
    again = ocr_images([str(corrupt)], engine="tesseract", workers=1, cache_dir=cache, progress=False)
    assert again[0].error and not again[0].cached


def test_engine_none_reads_nothing(tmp_path):
    out = list(iter_ocr(["a.jpg", "b.jpg"], engine="none", cache_dir=tmp_path, progress=False))
    assert out == [(0, OcrResult("", False, None)), (1, OcrResult("", False, None))]
    assert not any(tmp_path.iterdir())


def test_cache_key_holds_engine_version_and_models(monkeypatch):
    """Texts of two engine versions (PP-OCRv4 under rapidocr_onnxruntime 1.4, PP-OCRv6 under rapidocr 3) never
    mix: the key changes with the package version and with the model files."""
    key = ocr._cache_key("ab" * 32, "rapidocr", ("multi",))
    assert key == ocr._cache_key("ab" * 32, "rapidocr", ("multi",))
    monkeypatch.setattr(ocr, "_engine_version", lambda engine: "1.4.4")
    assert ocr._cache_key("ab" * 32, "rapidocr", ("multi",)) != key
    monkeypatch.undo()
    monkeypatch.setattr(ocr, "RAPIDOCR_MODELS", ("PP-OCRv4_det.onnx", "PP-OCRv4_rec.onnx"))
    assert ocr._cache_key("ab" * 32, "rapidocr", ("multi",)) != key


def test_negative_workers_rejected(tmp_path):
    with pytest.raises(ValueError, match="-2"):
        ocr_images(["a.jpg"], engine="tesseract", workers=-2, cache_dir=tmp_path, progress=False)


# ----------------------------------------------------------------- real engines


@pytest.mark.skipif(not HAS_RAPIDOCR, reason="rapidocr not installed")
def test_rapidocr_reads_rendered_text(tmp_path):
    good = _text_image(tmp_path / "pack.png", "ALPRO\nSOYA", size=(256, 256), font_size=40)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = ocr_images([good, str(corrupt)], engine="rapidocr", workers=1, cache_dir=tmp_path / "c", progress=False)
    assert set(res[0].text.upper().split()) >= {"ALPRO", "SOYA"}, res[0]
    assert res[0].error is None
    assert res[1].text == "" and res[1].error


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract not installed")
def test_worker_pool_keeps_input_order(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"junk")
    paths = [_text_image(tmp_path / "a.png", "ALPRO"), str(corrupt), _text_image(tmp_path / "b.png", "OATLY")]
    res = ocr_images(paths, engine="tesseract", workers=2, cache_dir=tmp_path / "cache", progress=False)
    assert [r.text for r in res] == ["ALPRO", "", "OATLY"]
    assert [r.error is None for r in res] == [True, False, True]
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2  # written by the parent, errors skipped


def test_workers_do_not_import_tensorflow_or_prodfuse():
    mod = ocr._standalone_module()
    worker = ocr._start_worker("none", ())
    try:
        worker[1].send((mod._loaded_modules, (["tensorflow", "keras", "prodfuse", "prodfuse.encoders.ocr"],)))
        assert worker[1].recv() == ("ok", [])
    finally:
        ocr._stop_workers([worker])
    assert worker[0].exitcode is not None


def test_stop_kills_busy_and_idle_workers_at_once():
    # multiprocessing.Pool.terminate(), used before, could hang for ever on an idle worker that waited holding the
    # task queue's lock; each worker now has its own pipe, and stopping kills a busy and an idle one alike.
    mod = ocr._standalone_module()
    busy, idle = ocr._start_worker("none", ()), ocr._start_worker("none", ())
    busy[1].send((mod._loaded_modules, ([],)))  # both workers up before the test acts
    idle[1].send((mod._loaded_modules, ([],)))
    assert busy[1].recv() == idle[1].recv() == ("ok", [])
    busy[1].send((time.sleep, (60,)))
    t0 = time.monotonic()
    ocr._stop_workers([busy, idle])
    assert time.monotonic() - t0 < 10
    assert busy[0].exitcode is not None and idle[0].exitcode is not None


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract not installed")
def test_a_dead_worker_fails_its_image_and_is_replaced(monkeypatch, tmp_path):
    started = []
    real_start = ocr._start_worker

    def start(engine, langs):
        worker = real_start(engine, langs)
        if not started:  # the first worker dies before it reads anything, as if the engine crashed
            worker[0].kill()
            worker[0].join()
        started.append(worker)
        return worker

    monkeypatch.setattr(ocr, "_start_worker", start)
    words = ["ALPRO", "OATLY", "SOYA"]
    paths = [_text_image(tmp_path / f"{k}.png", word) for k, word in enumerate(words)]
    res = ocr_images(paths, engine="tesseract", workers=2, cache_dir=tmp_path / "c", progress=False)
    died = [k for k, r in enumerate(res) if r.error]
    assert len(died) == 1, res
    assert "OCR worker died" in res[died[0]].error and res[died[0]].text == ""
    assert [r.text for k, r in enumerate(res) if k not in died] == [w for k, w in enumerate(words) if k not in died]
    assert len(started) == 3  # two, then one replacement
    assert all(w[0].exitcode is not None for w in started)  # none outlives the call


def test_workers_are_not_told_to_rerun_main(monkeypatch, tmp_path):
    import multiprocessing.spawn as spawn
    import types

    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "train_script.py")  # e.g. a CLI that imports TensorFlow at the top
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert "init_main_from_path" in spawn.get_preparation_data("w")
    with ocr._blank_main():
        data = spawn.get_preparation_data("w")
    assert not {"init_main_from_path", "init_main_from_name"} & set(data)
    assert sys.modules["__main__"] is script
