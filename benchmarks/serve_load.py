"""Load test of `prodfuse serve`: throughput and latency at concurrency 1, 8 and 32, OCR on and off, micro-batching
against `--max-batch 1`, and a 60 s run at concurrency 32 that must answer every request without a 5xx.

    python benchmarks/serve_load.py [--run runs/demo-product] [--seconds 15] [--long-seconds 60] [--ocr-workers 2]

Starts the service on 127.0.0.1 (a free port) as a subprocess per setting and drives it with a bounded async httpx
client (a fixed number of concurrent clients, each sending one request after the other, for a fixed time; loopback
only). Photos: the demo catalog's (and grocery val.csv's photos when ../shared is there), each request one photo
with its title.
- OCR off: every photo's OCR is already in the service's OCR cache (one warm-up pass), so a request costs decoding,
  the backbone and the model only.
- OCR on: every request sends a photo no cache has seen (one pixel changed, so its bytes differ), so RapidOCR reads
  each one in the service's worker processes.
Prints one table row per cell, then as its last line one JSON object with every figure and the goals' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos(run: Path, limit: int) -> list[tuple[str, bytes, str]]:
    """(name, bytes, title) of the run's catalog photos, then grocery val photos (no title) if present."""
    import pandas as pd

    config = json.loads((run / "config.json").read_text())
    catalog = Path(config["extraction"]["catalog_path"])
    cat = pd.read_csv(catalog, keep_default_na=False)
    out = [(r.image_path, (catalog.parent / r.image_path).read_bytes(), r.title) for r in cat.itertuples()]
    grocery = SHARED / "grocery" / "val.csv"
    if grocery.is_file():
        g = pd.read_csv(grocery)
        col = "image_path" if "image_path" in g.columns else g.columns[0]
        for p in g[col].head(limit):
            path = grocery.parent / p
            if path.is_file():
                out.append((str(p), path.read_bytes(), ""))
    return out[:limit]


def _unique(photos, n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """n photos whose bytes no cache has seen: one pixel set to a random colour, saved as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        _, data, title = photos[i % len(photos)]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.putpixel((0, 0), tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append((buf.getvalue(), title))
    return out


class Service:
    def __init__(self, run: Path, max_batch: int, ocr_workers: int, cache: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "prodfuse.cli", "serve", "--run", str(run), "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--ocr-workers", str(ocr_workers), "--ocr-cache", cache, "--quiet"]
        cmd += ["--max-queue", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the service was not ready in time")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def _drive(url: str, items, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients, each sending requests one after the other until `seconds` pass."""
    import httpx

    latencies, statuses = [], {}
    sent = 0
    next_item = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(c):
        nonlocal sent, next_item
        while time.perf_counter() < stop_at:
            data, title = items[next_item % len(items)]
            next_item += 1
            sent += 1
            t = time.perf_counter()
            try:
                r = await c.post(
                    url + "/v1/predict", files={"image": ("p.png", data)}, data={"title": title}, timeout=120
                )
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(limits=limits) as c:
        before = await _batch_counts(c, url)
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = await _batch_counts(c, url)
    calls, batched = after[0] - before[0], after[1] - before[1]
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 1),
        "sent": sent,
        "answered": sum(v for k, v in statuses.items() if isinstance(k, int)),
        "ok": ok,
        "errors_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
        "errors_other": sum(v for k, v in statuses.items() if not isinstance(k, int) or 400 <= k < 500),
        "throughput_rps": round(ok / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_batch": round(batched / calls, 2) if calls else None,
    }


async def _batch_counts(c, url: str) -> tuple[float, float]:
    text = (await c.get(url + "/metrics")).text
    values = {}
    for line in text.splitlines():
        if line.startswith("prodfuse_batch_size_count ") or line.startswith("prodfuse_batch_size_sum "):
            name, value = line.split()
            values[name] = float(value)
    return values.get("prodfuse_batch_size_count", 0.0), values.get("prodfuse_batch_size_sum", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo-product"))
    ap.add_argument("--seconds", type=float, default=15.0, help="per cell")
    ap.add_argument("--long-seconds", type=float, default=60.0, help="the zero-5xx run at concurrency 32")
    ap.add_argument("--ocr-workers", type=int, default=2)
    ap.add_argument("--photos", type=int, default=600)
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "model.keras").is_file():
        sys.exit(f"no run at {run}: make the demo run first (the README's first command), or pass --run")
    photos = _photos(run, args.photos)
    cached = [(data, title) for _, data, title in photos]
    fresh = _unique(photos, 4000)
    cache = tempfile.mkdtemp(prefix="serve-load-ocr-")
    rows = []

    def cell(name, max_batch, items, concurrencies, seconds, warm=False):
        service = Service(run, max_batch, args.ocr_workers, cache)
        try:
            service.wait_ready()
            if warm:  # every cached photo read once: OCR then costs a cache hit
                asyncio.run(_warm(service.url, cached))
            for c in concurrencies:
                r = asyncio.run(_drive(service.url, items, c, seconds))
                r.update(setting=name, max_batch=max_batch)
                rows.append(r)
                print(_row(r), flush=True)
        finally:
            r_code = service.stop()
            if r_code != 0:
                print(f"  (the service exited {r_code})")

    print(
        "| setting | max batch | concurrency | req/s | p50 ms | p95 ms | p99 ms | mean batch | 5xx | sent / answered |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cell("OCR off (cached)", 32, cached, [1, 8, 32], args.seconds, warm=True)
    cell("OCR off (cached)", 1, cached, [32], args.seconds)
    cell("OCR on (new photos)", 32, fresh, [1, 8, 32], args.seconds)
    cell("OCR off, long run", 32, cached, [32], args.long_seconds)

    def find(setting, batch, c):
        return next(r for r in rows if r["setting"] == setting and r["max_batch"] == batch and r["concurrency"] == c)

    batched, single = find("OCR off (cached)", 32, 32), find("OCR off (cached)", 1, 32)
    c8 = find("OCR off (cached)", 32, 8)
    long = find("OCR off, long run", 32, 32)
    figures = {
        "benchmark": "serve_load",
        "cells": rows,
        "batching_speedup_c32": round(batched["throughput_rps"] / single["throughput_rps"], 2),
        "p99_over_p50_c8": round(c8["p99_ms"] / c8["p50_ms"], 2),
        "long_run_5xx": long["errors_5xx"],
        "long_run_lost": long["sent"] - long["answered"],
        "goals": {"batching_speedup_c32": ">= 3", "p99_over_p50_c8": "<= 3", "long_run_5xx": 0, "long_run_lost": 0},
        "cpu_cores": os.cpu_count(),
    }
    print(json.dumps(figures))


async def _warm(url: str, items) -> None:
    import httpx

    async with httpx.AsyncClient() as c:
        sem = asyncio.Semaphore(8)

        async def one(data, title):
            async with sem:
                await c.post(url + "/v1/predict", files={"image": ("p.png", data)}, data={"title": title}, timeout=300)

        await asyncio.gather(*(one(d, t) for d, t in items))


def _row(r: dict) -> str:
    return (
        f"| {r['setting']} | {r['max_batch']} | {r['concurrency']} | {r['throughput_rps']} | {r['p50_ms']} | "
        f"{r['p95_ms']} | {r['p99_ms']} | {r['mean_batch']} | {r['errors_5xx']} | {r['sent']} / {r['answered']} |"
    )


if __name__ == "__main__":
    main()
