"""`prodfuse serve`: the REST service gives what Predictor.predict gives, batches concurrent requests, refuses bad
input with the right status and never a stack trace, survives a dead OCR worker, stops gracefully on SIGTERM, and
its web page works in a real headless browser."""

import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from prodfuse.cli import main  # noqa: E402
from prodfuse.data.demo import write_demo_catalog  # noqa: E402
from prodfuse.inference.predictor import Predictor  # noqa: E402
from prodfuse.serving.app import create_app  # noqa: E402
from prodfuse.serving.config import ServeConfig  # noqa: E402

PER_CLASS = 4  # of the demo's 12 classes: enough to learn colours and printed names in a few epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small run on demo photos with RapidOCR, served by uvicorn on loopback in a thread. The OCR cache is the
    shared one outside the clone (the demo photos are the same every time), so warm runs skip their OCR."""
    root = tmp_path_factory.mktemp("serve")
    demo = write_demo_catalog(root / "demo")
    cat = pd.read_csv(demo, keep_default_na=False)  # blank titles stay "", as a form sends them
    cat = cat.groupby("label", group_keys=False).head(PER_CLASS)
    cat.to_csv(root / "demo" / "small.csv", index=False)
    cache = None  # the default: $PRODFUSE_CACHE/ocr or ~/.cache/prodfuse/ocr
    args = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "64", "--views", "1"]
    args += ["--text-encoder", "tfidf", "--ocr", "rapidocr", "--ocr-workers", "2", "--no-progress", "--quiet"]
    assert main(["extract", "--catalog", str(root / "demo" / "small.csv"), "--out", str(root / "emb"), *args]) == 0
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)  # on 48 rows graph tracing would be most of the training time
    try:
        train = ["train", "--embeddings", str(root / "emb"), "--out", str(root / "run"), "--epochs", "3", "--quiet"]
        assert main(train) == 0
    finally:
        tf.config.run_functions_eagerly(False)
    index = ["index", "--embeddings", str(root / "emb"), "--space", "fused", "--run", str(root / "run")]
    assert main([*index, "--out", str(root / "index"), "--quiet"]) == 0
    predictor = Predictor.from_run(root / "run", ocr_workers=1, ocr_cache=cache)
    port = _free_port()
    config = ServeConfig(
        run=str(root / "run"), port=port, ocr_cache=cache, max_wait_ms=50, index=str(root / "index"), similar_k=5
    )
    server = uvicorn.Server(uvicorn.Config(create_app(config, predictor), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url)
    yield {"url": url, "root": root, "catalog": cat, "predictor": predictor, "cache": cache, "server": server}
    server.should_exit = True
    thread.join(60)


def _wait_ready(url: str, timeout: float = 120.0, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {timeout} s")


def _photo(served, i: int) -> tuple[bytes, str, str]:
    row = served["catalog"].iloc[i]
    return (served["root"] / "demo" / row["image_path"]).read_bytes(), row["title"], row["label"]


def _new_photo() -> bytes:
    """A photo no cache has seen, in this run or an earlier one (so OCR really runs)."""
    rng = np.random.default_rng()  # seeded from the OS: new bytes every time
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _assert_same(answer: dict, expected: dict) -> None:
    assert [t["label"] for t in answer["top_k"]] == expected["labels"]
    np.testing.assert_allclose([t["probability"] for t in answer["top_k"]], expected["probs"], atol=1e-5)
    assert answer["ocr_text"] == expected["ocr_text"]
    for stream in ("image", "text"):
        np.testing.assert_allclose(answer["contributions"][stream], expected[f"{stream}_contribution"], atol=1e-5)


# ------------------------------------------------------------------------------------------------ answers


def test_predict_gives_what_predictor_gives_and_batches_concurrent_requests(served):
    photos = [_photo(served, i) for i in range(0, 48, 4)]  # one per class
    expected = served["predictor"].predict([{"image": b, "title": t} for b, t, _ in photos], top_k=3)
    assert any(e["ocr_text"] for e in expected), "RapidOCR read nothing on the demo's packages"

    def ask(i):
        data, title, _ = photos[i]
        return httpx.post(
            f"{served['url']}/v1/predict",
            files={"image": ("photo.png", data, "image/png")},
            data={"title": title, "top_k": "3"},
            timeout=60,
        )

    before = _metric(served["url"], "prodfuse_batch_size_count"), _metric(served["url"], "prodfuse_batch_size_sum")
    with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
        answers = list(pool.map(ask, range(len(photos))))
    for r, e in zip(answers, expected):
        assert r.status_code == 200, r.text
        body = r.json()
        _assert_same(body, e)
        assert body["model"]["fingerprint"] == served["predictor"].run.fingerprint
        assert {"decode", "ocr", "queue", "model", "total"} <= set(body["timings_ms"])
    calls = _metric(served["url"], "prodfuse_batch_size_count") - before[0]
    items = _metric(served["url"], "prodfuse_batch_size_sum") - before[1]
    assert items == len(photos) and calls < len(photos), f"{items} items in {calls} model calls: no batching"


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_text_only_item_and_model_info(served):
    info = httpx.get(f"{served['url']}/v1/model").json()
    assert info["labels"] == served["predictor"].run.classes and info["ocr_engine"] == "rapidocr"
    assert info["text_fields"] == ["title", "description"] and info["backbone"] == "mobilenet_v2"
    # no photo: the image stream is blank, as modality dropout showed the model in training; the title decides
    item = {"title": "Oatly oat 1 L", "description": "Oatly oat, chilled."}
    r = httpx.post(f"{served['url']}/v1/predict", data={**item, "top_k": "3"})
    assert r.status_code == 200, r.text
    expected = served["predictor"].predict([item], top_k=3)[0]
    _assert_same(r.json(), expected)
    assert r.json()["contributions"]["image"] == pytest.approx(0.0, abs=1e-6)
    assert "ocr" not in r.json()["timings_ms"]


def test_answers_list_similar_products_from_the_index(served, tmp_path):
    data, _, label = _photo(served, 5)
    row = served["catalog"].iloc[5]
    texts = {c: row[c] for c in served["predictor"].text_cols}  # every text column, as extraction read them
    r = httpx.post(f"{served['url']}/v1/predict", files={"image": ("p.png", data)}, data=texts, timeout=60)
    assert r.status_code == 200, r.text
    similar = r.json()["similar"]
    # the indexed product itself comes first: the same photo, title and OCR text give the same fused vector
    assert len(similar) == 5 and similar[0]["id"] == served["catalog"].iloc[5]["product_id"]
    assert similar[0]["score"] == pytest.approx(1.0, abs=1e-3) and similar[0]["label"] == label
    assert [s["score"] for s in similar] == sorted((s["score"] for s in similar), reverse=True)
    info = httpx.get(f"{served['url']}/v1/model").json()
    assert info["index"]["space"] == "fused" and info["index"]["count"] == len(served["catalog"])
    # an index built from another model is refused when the service starts, naming the fix
    other = tmp_path / "other"
    shutil.copytree(served["root"] / "index", other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "run_model_sha256": "0" * 64}))
    from prodfuse.serving.app import Service

    config = ServeConfig(run=str(served["root"] / "run"), index=str(other))
    with pytest.raises(ValueError, match="not from the served run"):
        Service(config, served["predictor"])


def test_batch_multipart_and_json_answer_per_item(served):
    photos = [_photo(served, i) for i in (1, 5, 9)]
    expected = served["predictor"].predict([{"image": b, "title": t} for b, t, _ in photos], top_k=2)
    items = [{"image": i, "title": t} for i, (_, t, _) in enumerate(photos)] + [{"image": 7}]
    r = httpx.post(
        f"{served['url']}/v1/predict/batch",
        files=[("images", (f"{i}.png", b, "image/png")) for i, (b, _, _) in enumerate(photos)],
        data={"items": json.dumps(items), "top_k": "2"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for got, e in zip(results[:3], expected):
        _assert_same(got, e)
    assert results[3]["status"] == 422 and results[3]["error"] == "bad_image_index"

    body = {
        "items": [{"image_base64": base64.b64encode(b).decode(), "title": t} for b, t, _ in photos]
        + [{"image_base64": "not base64!"}, {"image_base64": base64.b64encode(b"GIF89a-nope").decode()}],
        "top_k": 2,
    }
    r = httpx.post(f"{served['url']}/v1/predict/batch", json=body, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for got, e in zip(results[:3], expected):
        _assert_same(got, e)
    assert [x.get("error") for x in results[3:]] == ["bad_base64", "not_an_image"]

    # what MIME encoders (a line break every 76 characters) and browsers' FileReader (a data: URL) send
    (b, t, _) = photos[0]
    wrapped = [base64.encodebytes(b).decode(), "data:image/png;base64," + base64.b64encode(b).decode()]
    body = {"items": [{"image_base64": w, "title": t} for w in wrapped], "top_k": 2}
    r = httpx.post(f"{served['url']}/v1/predict/batch", json=body, timeout=60)
    assert r.status_code == 200, r.text
    for got in r.json()["results"]:
        _assert_same(got, expected[0])


# ------------------------------------------------------------------------------------------------ bad input


def _bomb() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP): refused from the header, never decoded."""
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client_for(served):
    """TestClient(app with these settings) sharing the served run's predictor; ready before it is returned."""
    opened = []

    def make(**settings):
        config = ServeConfig(run=str(served["root"] / "run"), ocr_cache=served["cache"], **settings)
        client = TestClient(create_app(config, served["predictor"]), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        return client

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def test_bad_uploads_get_the_reasons_extraction_uses(served, client_for):
    client = client_for(max_upload_mb=0.5)
    good, title, _ = _photo(served, 0)
    cases = {
        "not_an_image": b"this is a text file, not a photo" * 10,
        "truncated_image": good[: len(good) // 2],
        "empty_file": b"",
        "too_many_pixels": _bomb(),
    }
    for reason, data in cases.items():
        r = client.post("/v1/predict", files={"image": ("x.png", data, "image/png")}, data={"title": title})
        assert (r.status_code, r.json()["error"]) == (422, reason), (reason, r.text)
        assert "upload" in r.json()["detail"] and "/tmp" not in r.json()["detail"]  # no server path leaks
    big = b"\xff\xd8" + os.urandom(600 * 1024)
    r = client.post("/v1/predict", files={"image": ("big.jpg", big, "image/jpeg")})
    assert (r.status_code, r.json()["error"]) == (413, "upload_too_large")

    def chunks():  # no Content-Length: stopped while it streams in
        for _ in range(20):
            yield b"x" * 65536

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_bad_fields_and_limits(served, client_for):
    client = client_for(max_items=2, max_queue=3)
    good, title, _ = _photo(served, 0)
    n = len(served["predictor"].run.classes)
    image = {"image": ("a.png", good, "image/png")}
    expect = [
        (dict(data={}), 422, "empty_item"),
        (dict(data={"title": "   "}), 422, "empty_item"),
        (dict(files=image, data={"colour": "red"}), 422, "unknown_field"),
        (dict(files=image, data={"top_k": "0"}), 422, "bad_top_k"),
        (dict(files=image, data={"top_k": str(n + 1)}), 422, "bad_top_k"),
        (dict(files=image, data={"top_k": "two"}), 422, "bad_top_k"),
        (dict(data={"image": "http://example.com/photo.jpg"}), 422, "bad_field"),  # never fetched
    ]
    for kwargs, status, error in expect:
        r = client.post("/v1/predict", **kwargs)
        assert (r.status_code, r.json()["error"]) == (status, error), (kwargs.get("data"), r.text)
    files = [("images", (f"{i}.png", good, "image/png")) for i in range(3)]
    r = client.post("/v1/predict/batch", files=files)
    assert (r.status_code, r.json()["error"]) == (413, "too_many_items")
    r = client.post("/v1/predict/batch", json={"items": [{"title": "x"}] * 3})
    assert (r.status_code, r.json()["error"]) == (413, "too_many_items")
    r = client.post("/v1/predict/batch", json={"items": [], "extra": 1})
    assert (r.status_code, r.json()["error"]) == (422, "unknown_field")
    r = client.post("/v1/predict/batch", content=b"{not json", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (422, "bad_json")
    for r in [client.get("/nope"), client.post("/v1/model")]:
        assert r.status_code in (404, 405) and "Traceback" not in r.text


def test_full_queue_is_refused_with_retry_after(served, client_for):
    client = client_for(max_queue=1, max_wait_ms=1000)
    good, title, _ = _photo(served, 0)
    files = [("images", (f"{i}.png", good, "image/png")) for i in range(2)]
    r = client.post("/v1/predict/batch", files=files)  # 2 items > the 1 admitted at once
    assert (r.status_code, r.json()["error"]) == (503, "overloaded") and r.headers["retry-after"] == "1"
    # a request in flight fills the queue: a second one at the same time is refused, then it is admitted again
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/predict", data={"title": title}, files={"image": ("a.png", good)})
        time.sleep(0.3)  # the first waits up to 1 s in the batcher
        second = client.post("/v1/predict", data={"title": title}, files={"image": ("a.png", good)})
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert first.result().status_code == 200
    assert client.post("/v1/predict", data={"title": title}, files={"image": ("a.png", good)}).status_code == 200


def test_api_key(served, client_for, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-key-0123456789\n")
    client = client_for(api_key_file=str(key))
    good, title, _ = _photo(served, 0)
    for path in ("/health/live", "/health/ready", "/"):
        assert client.get(path).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": "s3cret-key-0123456789"}):
        for method, path in (("get", "/v1/model"), ("get", "/metrics"), ("post", "/v1/predict"), ("get", "/docs")):
            r = getattr(client, method)(path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
    auth = {"Authorization": "Bearer s3cret-key-0123456789"}
    r = client.post("/v1/predict", headers=auth, data={"title": title}, files={"image": ("a.png", good)})
    assert r.status_code == 200
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ValueError, match="at least 16"):
        ServeConfig(run=str(served["root"] / "run"), api_key_file=str(short)).api_key()


def _corrupt_avif() -> bytes:
    """An AVIF photo with a few bytes changed so that Pillow's decoder raises RuntimeError (as the fuzz found)."""
    buf = io.BytesIO()
    try:
        Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="AVIF")
    except (KeyError, OSError):
        pytest.skip("this Pillow cannot write AVIF")
    rng = np.random.default_rng(0)
    for _ in range(2000):
        data = bytearray(buf.getvalue())
        for at in rng.integers(0, len(data), rng.integers(1, 9)):
            data[at] = rng.integers(0, 256)
        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                img.load()
        except RuntimeError:
            return bytes(data)
        except Exception:
            continue
    pytest.skip("no mutation of the AVIF photo made Pillow raise RuntimeError")


def _eps() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 120, 30)).save(buf, format="EPS")
    return buf.getvalue()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (what, request kwargs for POST /v1/predict/batch or /v1/predict, expected status, expected error); the status is
# of the whole request, or of the batch's one item when the request itself is fine (200)
HOSTILE = [
    # ~1000 deep parses or not depending on the stack already in use: refused as JSON, or as an item
    ("nested JSON body", dict(content=f'{{"items": {_nested(1000)}}}'), 422, ("bad_json", "bad_item")),
    ("nested JSON body, very deep", dict(content=f'{{"items": {_nested(100_000)}}}'), 422, "bad_json"),
    ("nested items field", dict(data={"items": _nested(5000)}), 422, "bad_json"),
    ("nested top_k", dict(content=f'{{"items": [{{"title": "x"}}], "top_k": {_nested(50)}}}'), 422, "bad_top_k"),
    ("top_k Infinity", dict(content='{"items": [{"title": "x"}], "top_k": Infinity}'), 422, "bad_json"),
    ("top_k -Infinity", dict(content='{"items": [{"title": "x"}], "top_k": -Infinity}'), 422, "bad_json"),
    ("top_k NaN", dict(content='{"items": [{"title": "x"}], "top_k": NaN}'), 422, "bad_json"),
    ("top_k 1e400", dict(content='{"items": [{"title": "x"}], "top_k": 1e400}'), 422, "bad_top_k"),
    ("item top_k 1e400", dict(content='{"items": [{"title": "x", "top_k": 1e400}]}'), 422, "bad_top_k"),
    ("item top_k 2.0", dict(content='{"items": [{"title": "x", "top_k": 2.0}]}'), 422, "bad_top_k"),
    ("form top_k 1e400", dict(single=True, data={"title": "x", "top_k": "1e400"}), 422, "bad_top_k"),
    ("long top_k text", dict(single=True, data={"title": "x", "top_k": "9" * 100_000}), 422, "bad_top_k"),
    ("corrupt AVIF photo", dict(single=True, photo=_corrupt_avif), 422, "unsupported_format"),
    ("EPS photo", dict(single=True, photo=_eps), 422, "unsupported_format"),
    ("title over the limit", dict(single=True, data={"title": "x" * 10_001}), 422, "text_too_long"),
    ("batch title over the limit", dict(json={"items": [{"title": "x" * 10_001}]}), 422, "text_too_long"),
]


@pytest.mark.parametrize("what, request_, status, error", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_4xx_with_its_reason(served, client_for, what, request_, status, error):
    client = client_for()
    request_ = dict(request_)
    if request_.pop("single", False):
        photo = request_.pop("photo", None)
        files = {"image": ("p.bin", photo(), "application/octet-stream")} if photo else None
        r = client.post("/v1/predict", files=files, data=request_.get("data", {"title": "x"}))
    else:
        headers = {"content-type": "application/json"} if "content" in request_ else None
        r = client.post("/v1/predict/batch", headers=headers, **request_)
    assert r.status_code < 500 and "Traceback" not in r.text, r.text[:500]
    body = r.json()
    if r.status_code == 200:  # the request was fine: the item carries its own error
        body = body["results"][0]
        assert body.get("status") == status, body
    else:
        assert r.status_code == status, r.text[:500]
    assert body["error"] in ((error,) if isinstance(error, str) else error), body
    assert len(body["detail"]) < 500 and "/tmp" not in body["detail"]  # short, and no server path


def test_text_fields_and_batch_bodies_are_bounded_in_bytes(served, client_for):
    client = client_for(max_text_chars=50, max_upload_mb=0.05)
    ok = client.post("/v1/predict", data={"title": "x" * 50})
    assert ok.status_code == 200, ok.text
    r = client.post("/v1/predict", data={"title": "t", "description": "d" * 51})
    assert (r.status_code, r.json()["error"]) == (422, "text_too_long")
    assert "'description'" in r.json()["detail"] and "50" in r.json()["detail"]
    # the body allowance is per item the request holds: one item cannot carry the bytes of a whole batch
    per_item = int(0.05 * 1024 * 1024) * 4 // 3 + 256 * 1024  # a photo as base64, and room for its text fields
    padded = '{"items": [{"title": "x"}]' + " " * per_item + "}"
    r = client.post("/v1/predict/batch", content=padded, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (413, "upload_too_large"), r.text
    good, _, _ = _photo(served, 0)
    files = [("images", (f"{i}.png", good, "image/png")) for i in range(per_item * 2 // len(good) + 1)]
    r = client.post("/v1/predict/batch", files=files, data={"items": json.dumps([{"image": 0}, {"image": 1}])})
    assert (r.status_code, r.json()["error"]) == (413, "upload_too_large"), r.text
    r = client.post("/v1/predict/batch", files=files[:2], data={"items": json.dumps([{"image": 0}, {"image": 1}])})
    assert r.status_code == 200 and [x.get("status") for x in r.json()["results"]] == [None, None], r.text


def test_an_internal_error_closes_the_connection_and_says_so(served, client_for, monkeypatch):
    client = client_for()
    service = client.app.state.service

    def broken():
        raise RuntimeError("a bug in the service at /srv/prodfuse/secret.py")

    monkeypatch.setattr(service, "model_info", broken)
    r = client.get("/v1/model")
    assert (r.status_code, r.json()["error"]) == (500, "internal")
    assert r.headers["connection"] == "close" and "secret" not in r.text


def test_no_server_path_in_readiness_or_model_info(served, monkeypatch):
    info = httpx.get(f"{served['url']}/v1/model").json()
    root = str(served["root"])

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(info) if root in s or s.startswith("/")], info
    assert info["index"]["name"] == "index"
    settings = served["predictor"].run.extraction["settings"]
    monkeypatch.setitem(settings, "weights", "/srv/models/mobilenet_v2_no_top.weights.h5")
    assert httpx.get(f"{served['url']}/v1/model").json()["weights"] == "mobilenet_v2_no_top.weights.h5"

    def fail():
        raise FileNotFoundError(f"[Errno 2] No such file: '{root}/emb/text_encoder/state.npz'")

    monkeypatch.setattr(served["predictor"], "load_encoders", fail)
    config = ServeConfig(run=str(served["root"] / "run"), ocr_cache=served["cache"])
    with TestClient(create_app(config, served["predictor"]), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while "could not be loaded" not in (r := client.get("/health/ready")).text:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 503 and "FileNotFoundError" in r.json()["detail"]
        answers = [r, client.post("/v1/predict", data={"title": "x"})]
        assert all(root not in a.text and "/emb/" not in a.text for a in answers), [a.text for a in answers]


def test_openapi_schema_holds_under_a_bounded_fuzz(served):
    """schemathesis' checks on generated requests to every documented operation: no 5xx, and every answer's status,
    content type, headers and body as the schema documents them. Bounded: 150 requests in all, derandomized."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{served['url']}/openapi.json")
    spec = schema.raw_schema
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
    for path, status in [("/v1/predict", "413"), ("/v1/predict/batch", "503"), ("/v1/model", "401")]:
        assert status in spec["paths"][path][next(iter(spec["paths"][path]))]["responses"], (path, status)

    @settings(
        max_examples=150,  # a few seconds; over every operation, schema-valid and schema-violating requests
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE))
    def check(case):
        # A schema cannot say which bytes are a photo (random "binary" gets 422 not_an_image) nor that an item needs
        # a photo or a non-blank text: schema-valid requests are not all accepted, so that check is left out. In a
        # multipart form every value is text (a "number" title is a valid title): schema-violating forms are not all
        # refused either.
        excluded = [positive_data_acceptance]
        if case.media_type == "multipart/form-data":
            excluded.append(negative_data_rejection)
        case.call_and_validate(timeout=60, excluded_checks=excluded)

    check()


# ------------------------------------------------------------------------------------------------ failures


def test_a_dead_ocr_worker_fails_one_request_then_the_pool_is_replaced(served):
    pool = served["server"].config.app.state.service.pool
    pids = pool.pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # the executor notices its dead worker
    ask = lambda: httpx.post(
        f"{served['url']}/v1/predict", files={"image": ("n.png", _new_photo())}, data={"title": "x"}, timeout=60
    )
    r = ask()
    assert (r.status_code, r.json()["error"]) == (503, "ocr_worker_died"), r.text
    assert "Traceback" not in r.text
    r = ask()
    assert r.status_code == 200, r.text
    assert set(pool.pids()).isdisjoint(pids)
    assert _metric(served["url"], "prodfuse_ocr_pool_restarts_total") == 1  # one pool replaced, counted once


def test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits_0(served):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "prodfuse.cli", "serve", "--run", str(served["root"] / "run"), "--port", str(port)]
    cmd += ["--max-wait-ms", "2500", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        photos = [_photo(served, i) for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
            futures = [
                pool.submit(
                    httpx.post, f"{url}/v1/predict", files={"image": ("p.png", b)}, data={"title": t}, timeout=60
                )
                for b, t, _ in photos
            ]
            time.sleep(0.8)  # accepted, waiting in the batcher for up to 2.5 s
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):
                httpx.post(f"{url}/v1/predict", data={"title": "late"}, timeout=5)
            assert [f.result().status_code for f in futures] == [200] * len(photos)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list[int]:
    """Pids of the processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running or stopped (a zombie has exited: only its parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_hung_ocr_worker_times_out_with_503_and_is_replaced(served, client_for):
    client = client_for(ocr_timeout=3.0)  # a 96 x 96 photo: 3 s (a healthy worker needs well under 1 s)
    pool = client.app.state.service.pool
    (stuck,) = pool.pids()
    os.kill(stuck, signal.SIGSTOP)  # hung: alive, holding its task, answering nothing
    runner = concurrent.futures.ThreadPoolExecutor(1)
    try:
        ask = lambda: client.post("/v1/predict", files={"image": ("n.png", _new_photo())}, data={"title": "x"})
        started = time.monotonic()
        r = runner.submit(ask).result(timeout=60)  # without a deadline this waits for ever
        assert (r.status_code, r.json()["error"]) == (503, "ocr_timeout"), r.text
        assert r.headers["retry-after"] == "1" and time.monotonic() - started < 30
        deadline = time.monotonic() + 10
        while _alive(stuck):
            assert time.monotonic() < deadline, "the stuck worker was not killed"
            time.sleep(0.1)
        assert stuck not in pool.pids() and len(pool.pids()) == 1
        r = ask()
        assert r.status_code == 200 and r.json()["timings_ms"]["ocr"] > 0, r.text
    finally:
        if _alive(stuck):
            os.kill(stuck, signal.SIGKILL)
        runner.shutdown(wait=False)


def test_photos_sent_while_the_ocr_pool_is_replaced_wait_for_the_new_one(served, client_for):
    client = client_for(ocr_workers=2)
    pool = client.app.state.service.pool
    for pid in pool.pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # the executor notices its dead workers
    ask = lambda: client.post("/v1/predict", files={"image": ("n.png", _new_photo())}, data={"title": "x"})
    with concurrent.futures.ThreadPoolExecutor(4) as runner:
        first = runner.submit(ask)  # finds the broken pool and starts a new one (a second or so)
        time.sleep(0.3)
        during = [runner.submit(ask) for _ in range(3)]
        assert (first.result().status_code, first.result().json()["error"]) == (503, "ocr_worker_died")
        statuses = [f.result().status_code for f in during]
    assert statuses == [200, 200, 200], [f.result().text for f in during]


def test_ocr_workers_exit_when_the_server_is_killed(served):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "prodfuse.cli", "serve", "--run", str(served["root"] / "run"), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--ocr-workers", "2", "--quiet"], env=env, stdout=subprocess.DEVNULL)
    children = []
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        children = _children(proc.pid)  # the OCR workers and multiprocessing's resource tracker
        assert len(children) >= 2, children
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"orphans still alive: {[p for p in children if _alive(p)]}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in children:  # only when the test failed: leave no orphan behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ the page


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium + chromedriver (.ci/run installs Debian's chromium and chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_web_page_classifies_an_uploaded_photo_in_a_real_browser(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    data, title, _ = _photo(served, 8)
    photo = tmp_path / "photo.png"
    photo.write_bytes(data)
    expected = served["predictor"].predict([{"image": data, "title": title}], top_k=5)[0]
    driver = _chrome()
    try:
        driver.get(served["url"] + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.ID, "f-title"))
        driver.find_element(By.ID, "file").send_keys(str(photo))
        driver.find_element(By.ID, "f-title").send_keys(title)
        wait.until(ec.element_to_be_clickable((By.ID, "classify"))).click()
        wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#top .row")))
        rows = driver.find_elements(By.CSS_SELECTOR, "#top .row .label")
        assert [r.text for r in rows] == expected["labels"]
        assert driver.find_element(By.ID, "ocr").text == (expected["ocr_text"] or "(no text read)")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#contrib .row")) == 2
        similar = driver.find_elements(By.CSS_SELECTOR, "#similar tr")
        assert len(similar) == 5 and served["catalog"].iloc[8]["product_id"] in similar[0].text
        if os.environ.get("PRODFUSE_SCREENSHOT"):
            driver.save_screenshot(os.environ["PRODFUSE_SCREENSHOT"])
        assert not driver.find_element(By.ID, "pathbox").is_displayed()  # a flat run's answer has no path
        # a hierarchical run's answer (as the service gives it) shows its path, coarse to fine
        driver.execute_script(
            "show({top_k: [], ocr_text: '', contributions: {}, similar: null, timings_ms: {}, path: arguments[0]})",
            [
                {"level": "family", "label": "photo", "probability": 0.99},
                {"level": "kind", "label": "A", "probability": 0.9},
            ],
        )
        shown = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#path .row .label")]
        assert shown == ["family: photo", "kind: A"] and driver.find_element(By.ID, "pathbox").is_displayed()
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # nothing loaded from outside the service
        hosts = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(h.startswith(served["url"]) or h.startswith("blob:") for h in hosts), hosts
    finally:
        driver.quit()
