"""One Ctrl-C (SIGINT to the process group, as a terminal sends it) or one SIGTERM stops `prodfuse extract`
mid-OCR within seconds: no traceback, no process left behind, exit 130 / 143, a resume hint, and the same
command then completes from the kept work (issue 10)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("rapidocr") is None, reason="rapidocr is not installed"),
    pytest.mark.skipif(
        not Path("/proc/self/stat").is_file() or not hasattr(os, "killpg"),
        reason="needs POSIX process groups and /proc",
    ),
]

N_ROWS = 300
DISTINCT = 20  # distinct images, so OCR jobs
STOP_WITHIN_S = 10


def _font(size):
    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf")) if Path("/usr/share/fonts").exists() else []
    bold = [f for f in fonts if "Sans-Bold." in f.name] or fonts
    return ImageFont.truetype(str(bold[0]), size) if bold else ImageFont.load_default(size=size)


def _catalog(root: Path) -> Path:
    """N_ROWS small photos in DISTINCT colours, two thirds of them with printed words. OCR reads identical
    files once, so it has DISTINCT images to read: enough to be busy when the signal comes (each takes a
    good fraction of a second, RapidOCR upscales to 736 px), few enough that the resume run is quick."""
    (root / "img").mkdir()
    font = _font(18)
    rows = ["product_id,image_path,title,label"]
    for i in range(N_ROWS):
        v = i % DISTINCT
        img = Image.new("RGB", (64, 64), ((v * 37) % 200 + 55, (v * 91) % 200 + 55, (v * 53) % 200 + 55))
        if v % 3:
            ImageDraw.Draw(img).text((4, 20), f"x{v}", fill="black", font=font)
        img.save(root / "img" / f"{i}.png")
        rows.append(f"p{i},img/{i}.png,thing {i},{'abc'[i % 3]}")
    path = root / "catalog.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _command(catalog: Path, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "prodfuse.cli",
        "extract",
        "--catalog",
        str(catalog),
        "--out",
        str(out),
        "--backbone",
        "mobilenet_v2",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--views",
        "1",
        "--ocr",
        "rapidocr",
        "--ocr-workers",
        "2",
        "--ocr-cache",
        str(cache),
        "--no-progress",
        "--shard-rows",
        "50",
    ]


def _group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of process group `pgid`, as 'pid cmdline'."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{d.name} {cmd.strip()}")
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return found


def _interrupt_and_resume(tmp_path: Path, sig: int, expected_rc: int) -> None:
    catalog = _catalog(tmp_path)
    out, cache = tmp_path / "emb", tmp_path / "ocr-cache"
    cmd = _command(catalog, out, cache)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )  # its own process group, like a terminal job
    pgid = proc.pid
    try:
        # Wait until the OCR worker processes are reading images (some results cached), so the signal lands
        # while the pool has queued work, which is what used to hang.
        deadline = time.monotonic() + 90
        while not any(cache.rglob("*.json")):
            if proc.poll() is not None:
                pytest.fail(f"extract ended before OCR started: rc {proc.returncode}\n{proc.communicate()[1]}")
            if time.monotonic() > deadline:
                pytest.fail("OCR did not start within 90 s")
            time.sleep(0.05)
        time.sleep(0.3)
        work_before = {p.name for p in (out / ".work").glob("images-*.npz")}
        shards_before = {p.name for p in out.glob("part-*")}
        cached_before = len(list(cache.rglob("*.json")))
        assert cached_before < DISTINCT, "OCR finished before the signal; the catalog is too easy"

        os.killpg(pgid, sig)
        t0 = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"extract did not stop within {STOP_WITHIN_S} s of one {signal.Signals(sig).name}")
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == expected_rc, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert "resume" in stderr, stderr
    assert stop_s < STOP_WITHIN_S
    # Nothing of the group survives: OCR workers and multiprocessing's resource tracker exit with it.
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_members(pgid), _group_members(pgid)
    # Completed work is kept for the resume: image chunk files, shards, OCR cache entries.
    kept = {p.name for p in (out / ".work").glob("images-*.npz")}
    assert work_before <= kept, (work_before, kept)
    assert shards_before <= {p.name for p in out.glob("part-*")}
    assert len(list(cache.rglob("*.json"))) >= cached_before

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["summary"]
    assert manifest["complete"]
    assert summary["input_rows"] == N_ROWS
    assert summary["embedded_rows"] + summary["rejected_rows"] == N_ROWS
    assert sum(s["rows"] for s in manifest["shards"]) == summary["embedded_rows"]
    # The interrupted run's OCR was reused: every row of an image read before the signal is a cache hit.
    assert summary["ocr"]["cache_hits"] >= cached_before * (N_ROWS // DISTINCT)


def test_one_ctrl_c_stops_extract_and_it_resumes(tmp_path):
    _interrupt_and_resume(tmp_path, signal.SIGINT, 130)


def test_one_sigterm_stops_extract_and_it_resumes(tmp_path):
    _interrupt_and_resume(tmp_path, signal.SIGTERM, 143)
