"""`--engine ray` on a local Ray cluster (2 CPUs): the same shard folder as the local engine, every row accounted for
when images are bad, an OCR actor is killed, the driver is killed, or a worker cannot read a photo."""

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from prodfuse.data import shards
from prodfuse.data.demo import write_demo_catalog
from prodfuse.extraction.config import ExtractConfig
from prodfuse.extraction.extract import extract

ray = pytest.importorskip("ray", reason="the ray extra: pip install -e .[ray]")

HIDDEN = "hidden-from-workers"  # photos under a folder of this name exist for the driver only (see the fixture)
FAST = dict(backbone="mobilenet_v2", weights="none", image_size=64, views=1, progress=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    def hide_from_workers():
        # A worker node without the storage mounted: opening a photo under HIDDEN fails there, not on the driver.
        import builtins

        real_open = builtins.open

        def open_(file, *args, **kwargs):
            if HIDDEN in str(file):
                raise FileNotFoundError(2, "not mounted on this worker", str(file))
            return real_open(file, *args, **kwargs)

        builtins.open = open_

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": hide_from_workers},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_catalog(tmp_path_factory.mktemp("demo"))


def both(catalog, tmp_path, **settings):
    """(local summary, ray summary, local folder, ray folder) of the same extraction."""
    out = {}
    for engine in ("local", "ray"):
        out[engine] = tmp_path / engine
        out[engine + "_summary"] = extract(
            ExtractConfig(catalog=str(catalog), out=str(out[engine]), engine=engine, **{**FAST, **settings})
        )
    return out["local_summary"], out["ray_summary"], out["local"], out["ray"]


def rejects(folder):
    with open(folder / shards.REJECTS) as f:
        return [(r["id"], r["reason"]) for r in csv.DictReader(f)]


def assert_same_folder(a, b, atol=1e-5):
    x, y = shards.read_shards(a), shards.read_shards(b)
    assert list(x["product_id"]) == list(y["product_id"])  # same rows, same order
    assert sorted(x) == sorted(y)
    for col in x:
        if x[col].dtype.kind == "f":
            np.testing.assert_allclose(x[col], y[col], atol=atol, rtol=0, err_msg=col)
        else:
            np.testing.assert_array_equal(x[col], y[col], err_msg=col)
    assert rejects(a) == rejects(b)
    ma, mb = shards.read_manifest(a), shards.read_manifest(b)
    assert sorted(ma) == sorted(mb)
    assert ma["settings"] == mb["settings"] and ma["encoders"] == mb["encoders"]
    assert [s["rows"] for s in ma["shards"]] == [s["rows"] for s in mb["shards"]]
    return x


def test_bad_images_and_rows_a_worker_cannot_read_are_all_accounted_for_minilm_on_actors(
    cluster, tiny_catalog, tiny_st_model, tmp_path
):
    img = tiny_catalog.parent / "img"
    (img / "empty.png").write_bytes(b"")
    (img / "text.jpg").write_text("this is not an image")
    hidden = tiny_catalog.parent / "img" / HIDDEN
    hidden.mkdir()
    (hidden / "h.png").write_bytes((img / "1.png").read_bytes())
    with open(tiny_catalog, "a") as f:
        f.write("b1,img/missing.png,t,,red,a\n")
        f.write("b2,img/empty.png,t,,red,a\n")
        f.write("b3,img/text.jpg,t,,red,a\n")
        f.write("b4,../outside.png,t,,red,a\n")
        f.write("b5,,t,,red,a\n")
        f.write(f"h1,img/{HIDDEN}/h.png,t,,red,a\n")
    minilm = dict(text_encoder="minilm", text_model=str(tiny_st_model))  # encoded per chunk on actors, not the driver
    local, remote, a, b = both(tiny_catalog, tmp_path, ocr="none", shard_rows=5, **minilm)
    want = {
        "b1": "missing_file",
        "b2": "empty_file",
        "b3": "not_an_image",
        "b4": "outside_catalog_dir",
        "b5": "missing_path",
    }
    assert dict(rejects(b)) == {**want, "h1": "unreadable_on_worker"}
    assert dict(rejects(a)) == want  # the driver's own process reads h1 fine
    assert remote["embedded_rows"] + remote["rejected_rows"] == remote["input_rows"] == 18
    x, y = shards.read_shards(a), shards.read_shards(b)
    assert list(y["product_id"]) == [f"p{i}" for i in range(12)] and list(x["product_id"])[:12] == list(y["product_id"])
    for col in ("image_embedding", "text_embedding"):
        np.testing.assert_allclose(x[col][:12], y[col], atol=1e-5, rtol=0, err_msg=col)
    assert y["text_embedding"].shape == (12, 32)  # the tiny test model's width


def _ocr_actor_pids():
    """Ray names an actor's process after its class (`ray::MapWorker(MapBatches(OcrActor))`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"OcrActor" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_killing_an_ocr_actor_loses_no_row(cluster, demo, tmp_path):
    rows = (demo.read_text().splitlines()[:1] + demo.read_text().splitlines()[1:481:12])[:41]  # 40 products
    catalog = demo.parent / "forty.csv"
    catalog.write_text("\n".join(rows) + "\n")
    settings = dict(ocr="rapidocr", ocr_cache=str(tmp_path / "cold-ocr-cache"))  # cold: OCR takes seconds
    ref = tmp_path / "ref"
    extract(ExtractConfig(catalog=str(catalog), out=str(ref), **FAST, ocr="rapidocr"))
    killed = []

    def killer():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            pids = _ocr_actor_pids()
            if pids and (tmp_path / "cold-ocr-cache").exists() and any((tmp_path / "cold-ocr-cache").rglob("*.json")):
                os.kill(pids[0], signal.SIGKILL)  # mid-run: after its first results reached the cache
                killed.append(pids[0])
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    out = tmp_path / "ray"
    summary = extract(ExtractConfig(catalog=str(catalog), out=str(out), engine="ray", **FAST, **settings))
    t.join()
    assert killed, "no OCR actor was seen to kill"
    assert summary["embedded_rows"] == 40 and summary["rejected_rows"] == 0
    assert summary["ocr"]["cache_hits"] < 40  # it really read photos, so the kill landed mid-run
    x, y = shards.read_shards(ref), shards.read_shards(out)
    assert list(x["ocr_text"]) == list(y["ocr_text"]) and list(x["product_id"]) == list(y["product_id"])


def test_demo_catalog_ray_equals_local_and_a_killed_driver_resumes(cluster, demo, tmp_path):
    """The demo catalog through both engines (RapidOCR from the shared cache, 8 shards); the ray driver is killed
    (SIGKILL) once two chunks are saved, and the same extraction run again resumes from them."""
    settings = dict(**FAST, ocr="rapidocr", shard_rows=60)
    ref = tmp_path / "ref"
    local = extract(ExtractConfig(catalog=str(demo), out=str(ref), **settings))
    out = tmp_path / "ray"
    address = ray.get_runtime_context().gcs_address  # the driver joins the test's cluster, which outlives it
    argv = [sys.executable, "-m", "prodfuse.cli", "extract", "--engine", "ray", "--ray-address", address]
    argv += ["--catalog", str(demo), "--out", str(out), "--backbone", "mobilenet_v2", "--weights", "none"]
    argv += ["--image-size", "64", "--views", "1", "--ocr", "rapidocr", "--shard-rows", "60", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second_chunk = out / ".work" / "images-00001.npz"
    deadline = time.monotonic() + 180
    while not second_chunk.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    err = proc.communicate()[1].decode()
    assert second_chunk.exists(), err[-2000:]
    remote = extract(ExtractConfig(catalog=str(demo), out=str(out), engine="ray", **settings))
    assert remote["image_chunks_resumed"] >= 2  # the chunks saved before the kill were not embedded again
    assert remote["engine"] == "ray" and local["engine"] == "local"
    assert remote["ray"]["ocr_actors"] == 2 and remote["ray"]["image_actors"] == 1
    got = assert_same_folder(ref, out)
    assert len(got["product_id"]) == 480 and got["has_text"].sum() == local["with_text_this_run"] > 400
    assert remote["ocr"]["with_words"] == local["ocr"]["with_words"] > 100
    assert shards.read_manifest(out)["text_fit"] == {"texts": 435, "fitted_on": 435, "seed": None}


def test_unreachable_address_fails_fast_and_writes_nothing(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process: the address is dialled
    # loopback only: no test touches the network
    out = tmp_path / "out"
    for address, says in [
        ("127.0.0.1:1", "cannot reach the Ray cluster at '127.0.0.1:1'"),
        ("nohost", "is not HOST:PORT"),
    ]:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=says):
            extract(ExtractConfig(catalog=str(demo), out=str(out), engine="ray", ray_address=address))
        assert time.monotonic() - t0 < 30
    assert not out.exists()


def test_without_ray_installed_the_error_names_the_extra(demo, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[ray\]"):
        extract(ExtractConfig(catalog=str(demo), out=str(tmp_path / "o"), engine="ray"))
    assert not (tmp_path / "o").exists()


def test_ray_flags_need_the_ray_engine():
    with pytest.raises(ValueError, match="ocr_actors apply to engine 'ray' only"):
        ExtractConfig(ocr_actors=2)
    with pytest.raises(ValueError, match="engine must be one of"):
        ExtractConfig(engine="spark")


def test_pool_plan():
    from prodfuse.extraction.ray_engine import Pools

    assert Pools.plan({"CPU": 16}) == Pools(1, 16, 0.0)  # CPU backbone shares the cores, as locally
    assert Pools.plan({"CPU": 16, "GPU": 4}) == Pools(4, 12, 1.0)
    assert Pools.plan({"CPU": 8, "GPU": 1}, gpus_per_image_actor=0.5) == Pools(2, 6, 0.5)
    with pytest.raises(ValueError, match="cluster has 2"):
        Pools.plan({"CPU": 2}, ocr_actors=3)
    with pytest.raises(ValueError, match="cluster has 0 GPUs"):
        Pools.plan({"CPU": 2}, gpus_per_image_actor=1)
    # TensorFlow threads of a CPU image actor: the backbone's share (~1/11 of a core per view) of the OCR cores
    assert Pools(1, 2, 0.0).image_threads(2, views=1, ocr=True) == 1  # this machine: one thread, not one per core
    assert Pools(1, 64, 0.0).image_threads(64, views=1, ocr=True) == 6
    assert Pools(2, 64, 0.0).image_threads(64, views=6, ocr=True) == 17
    assert Pools(2, 64, 0.0).image_threads(64, views=1, ocr=False) == 32  # no OCR: the backbone is the work
    assert Pools(4, 12, 1.0).image_threads(16, views=1, ocr=True) is None  # GPU actors keep TensorFlow's defaults


@pytest.mark.realdata
def test_grocery_val_ray_equals_local(cluster, tmp_path):
    """Real shelf photos, 6 views each, RapidOCR (cached), embedded --like the train shards as the accuracy tests do."""
    from test_accuracy import SHARED, grocery_shards

    train, val = grocery_shards()
    out = tmp_path / "ray"
    catalog = SHARED / "data" / "grocery" / "val.csv"
    summary = extract(ExtractConfig(catalog=str(catalog), out=str(out), like=str(train), engine="ray", progress=False))
    got = assert_same_folder(val, out)
    assert len(got["product_id"]) == 296 and got["image_views"].shape == (296, 5 * 1280)
    assert summary["ocr"]["with_words"] > 50


def test_cluster_yaml_example_parses_and_its_command_is_valid():
    import shlex

    import yaml

    from prodfuse.cli import build_parser

    text = (ROOT / "deploy" / "ray-cluster.yaml").read_text()
    spec = yaml.safe_load(text)
    assert spec["head_node_type"] in spec["available_node_types"]
    lines = [ln.strip().lstrip("#").strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("prodfuse extract --engine ray"))
    command = lines[start].rstrip("\\") + " " + lines[start + 1]
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.engine == "ray" and args.ray_address == "auto" and args.gpus_per_image_actor == 1
