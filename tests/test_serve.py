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
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # nothing loaded from outside the service
        hosts = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(h.startswith(served["url"]) or h.startswith("blob:") for h in hosts), hosts
    finally:
        driver.quit()
