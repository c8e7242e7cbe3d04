"""`prodfuse serve`: the REST service and web page for a run (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from prodfuse.cli.common import add_trust_pickle, default, make_config
from prodfuse.serving.config import LOOPBACK, ServeConfig

HELP = "REST service + web page: classify a product from its photo and title"


def add_args(p: argparse.ArgumentParser) -> None:
    d = lambda name: default(ServeConfig, name)
    p.add_argument("--run", required=True, help="run folder written by train")
    p.add_argument("--host", default=d("host"), help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d("port"), help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=d("max_batch"), help="items per model call (default 32)")
    p.add_argument(
        "--max-wait-ms", type=float, default=d("max_wait_ms"), help="how long a batch waits for more items (10)"
    )
    p.add_argument(
        "--max-queue", type=int, default=d("max_queue"), help="items admitted at once; more get 503 (default 256)"
    )
    p.add_argument("--max-items", type=int, default=d("max_items"), help="items per batch request (default 64)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=d("max_upload_mb"),
        help="largest photo, and a batch body's bytes per item (default 10 MB)",
    )
    p.add_argument(
        "--max-text-chars",
        type=int,
        default=d("max_text_chars"),
        help="longest text field (title, description) of an item; longer is refused with 422 (default 10000)",
    )
    p.add_argument("--ocr-workers", type=int, default=d("ocr_workers"), help="OCR worker processes (default 1)")
    p.add_argument("--ocr-cache", default=None, help="OCR cache folder (default ~/.cache/prodfuse/ocr)")
    p.add_argument(
        "--ocr-timeout",
        type=float,
        default=d("ocr_timeout"),
        help="OCR seconds per megapixel of a photo, at least this per photo (default 5): past it the worker is "
        "replaced and the item answered 503 ocr_timeout",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help="file holding one key; every endpoint but /health/* then needs 'Authorization: Bearer KEY'",
    )

    p.add_argument(
        "--index",
        default=None,
        help="index folder (prodfuse index) built from this run (fused space) or its shards: each answer then "
        "lists the most similar products",
    )
    p.add_argument("--similar-k", type=int, default=d("similar_k"), help="similar products per answer (default 5)")
    add_trust_pickle(p)


def config(args: argparse.Namespace) -> ServeConfig:
    return make_config(ServeConfig, args)


def run(cfg: ServeConfig, stop=None) -> int:
    import uvicorn

    from prodfuse.inference.predictor import Predictor
    from prodfuse.serving.app import create_app

    log = logging.getLogger("prodfuse.cli")
    predictor = Predictor.from_run(
        cfg.run, ocr_workers=cfg.ocr_workers, ocr_cache=cfg.ocr_cache, trust_pickle=cfg.trust_pickle
    )
    app = create_app(cfg, predictor)
    if cfg.api_key_file is None:
        where = "this machine only" if cfg.host in LOOPBACK else f"EVERY client that reaches {cfg.host}"
        log.warning("no --api-key-file: no authentication; listening on %s:%d (%s)", cfg.host, cfg.port, where)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=60)
    )
    print(
        f"serving {predictor.run.path} on http://{cfg.host}:{cfg.port}/ (page), /v1/predict, /docs; pid {os.getpid()}"
    )
    # uvicorn finishes the requests it accepted on SIGTERM / Ctrl-C, then re-raises the signal to the handler it
    # found: make that a no-op, so a graceful stop exits 0 instead of taking the interrupted path.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped: every accepted request was answered")
    return 0
