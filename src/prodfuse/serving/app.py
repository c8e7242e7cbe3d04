"""The service: `create_app(config, predictor)` -> a FastAPI app that classifies products from a photo and text.

Every item goes the `Predictor`'s way (the photo decoded like a catalog image, OCR with the shared cache, the
run's text encoder and model), so a request gets what `Predictor.predict` gives for the same item. Request
handlers only parse and hand over: decoding runs in a thread pool, OCR in worker processes, the backbone and the
model in one thread that takes items of concurrent requests in batches (see `MicroBatcher`).
"""

from __future__ import annotations

import asyncio
import binascii
import datetime
import hmac
import json
import logging
import reprlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from prodfuse.encoders.image import ALLOWED_FORMATS, ImageRejected
from prodfuse.inference.predictor import Predictor
from prodfuse.modeling.hierarchy import back_off
from prodfuse.modeling.model_card import model_card
from prodfuse.serving.batcher import MicroBatcher
from prodfuse.serving.config import ServeConfig
from prodfuse.serving.metrics import Metrics
from prodfuse.serving.ocr_pool import OcrPool, OcrTimeout, OcrWorkerDied
from prodfuse.serving.uploads import decode_base64, decode_upload, remove, save_upload

log = logging.getLogger(__name__)

PUBLIC = ("/health/live", "/health/ready", "/", "/favicon.ico")  # everything else needs the key, when one is set
ENDPOINTS = ("/", "/v1/predict", "/v1/predict/batch", "/v1/model", "/health/live", "/health/ready", "/metrics")
DEFAULT_TOP_K = 5
FORM_SLACK = 256 * 1024  # multipart boundaries and text fields beside the photo bytes
_SHOW = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 2, 60, 60, 4, 4


def _show(value) -> str:
    """A client's value in an error detail: short, and safe for any nesting (a plain repr of a deeply nested list
    recurses, and a 1 MB string would come back whole)."""
    return _SHOW.repr(value)


class ApiError(Exception):
    """An answer other than 200: its status, a reason name (extraction's reject reasons for photos) and a detail."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail}


class _BodyTooLarge(Exception):
    pass


def _error_response(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class _LimitBody:
    """ASGI wrapper: a body over the endpoint's limit is refused with 413 from its Content-Length, or stopped as
    soon as the bytes received pass the limit (chunked uploads), before it is parsed or spooled."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _error_response(413, "upload_too_large", _too_large(int(length), limit))(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(_too_large(received, limit))
            return message

        await self.app(scope, limited, send)


def _too_large(size: int, limit: int) -> str:
    return f"the request body has {size} bytes, over the limit of {limit} (--max-upload-mb)"


class Service:
    """What the app's handlers share: the predictor, the OCR pool, the batcher, the metrics and the limits."""

    def __init__(self, config: ServeConfig, predictor: Predictor):
        self.config = config
        self.predictor = predictor
        self.run = predictor.run
        self.metrics = Metrics()
        self.key = config.api_key()
        self.pool = OcrPool(
            predictor.ocr_engine,
            predictor.ocr_lang,
            config.ocr_workers,
            config.ocr_cache,
            on_replace=self.metrics.ocr_restarts.inc,
        )
        self.batcher = MicroBatcher(self._compute, config.max_batch, config.max_wait_ms, self._on_batch)
        self.decode = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="prodfuse-decode")
        self._tmp = tempfile.TemporaryDirectory(prefix="prodfuse-serve-")
        self.tmp = Path(self._tmp.name)
        self.ready = False
        self.load_error: str | None = None
        self.inflight = 0
        self.text_fields = list(predictor.text_cols)
        self.num_classes = len(self.run.classes)
        self.hierarchy = self.run.hierarchy  # a run trained with label_cols answers a path and takes min_confidence
        self.options = ("top_k", "min_confidence") if self.hierarchy is not None else ("top_k",)
        self.index, self.to_space = None, None
        if config.index:
            from prodfuse.retrieval.index import Index
            from prodfuse.retrieval.spaces import ArraysToSpace

            self.index = Index.load(config.index)
            self.to_space = ArraysToSpace(self.index.manifest, self.run)  # refuses an index the run cannot query

    # ---------------------------------------------------------------------------------------------- life

    def _load(self) -> None:
        """Encoders, OCR workers and one item through the whole path, so the first request pays no start-up."""
        self.predictor.load_encoders()
        self.pool.start()
        size, views = self.predictor.image_size, self.predictor.views
        grey = np.full((views, size, size, 3) if views > 1 else (size, size, 3), 128, np.uint8)
        self._compute([(grey if "image" in self.run.inputs else None, {c: "warm up" for c in self.text_fields}, "", 1)])

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except Exception as e:  # the log has the error; clients get its kind only (its text names server paths)
            log.error("the service could not load its model: %s: %s", type(e).__name__, e)
            self.load_error = f"the model could not be loaded ({type(e).__name__}); the server log has the details"
            return
        self.ready = True
        log.info("ready: %s (%d classes)", self.run.path, self.num_classes)

    async def stop(self) -> None:
        await self.batcher.stop()
        await asyncio.to_thread(self.pool.close)
        self.decode.shutdown(wait=True, cancel_futures=True)
        self._tmp.cleanup()

    # ---------------------------------------------------------------------------------------------- work

    def _compute(self, payloads: list) -> list:
        """Runs in the model thread: one backbone and model call for every item of the batch."""
        started = time.perf_counter()
        ok, extras, arrays = self.predictor.prepare_arrays(
            [p[0] for p in payloads], [p[1] for p in payloads], [p[2] for p in payloads]
        )
        results = self.predictor.results(ok, extras, arrays, max(p[3] for p in payloads))
        if self.index is not None and ok:
            for i, vector in zip(ok, self.to_space(arrays)):
                results[i]["similar"] = [] if vector is None else self._similar(vector)
        ms = (time.perf_counter() - started) * 1000
        return [(r, ms) for r in results]

    def _similar(self, vector) -> list[dict]:
        table = self.index.search(vector, self.config.similar_k)[0]
        keep = [c for c in ("id", "score", "label", "text", "image_path") if c in table.columns]
        return [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in table[keep].to_dict("records")
        ]

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    def admit(self, n: int) -> None:
        if not self.ready:
            detail = self.load_error or "the model is loading; retry shortly"
            raise ApiError(503, "not_ready", detail, {"Retry-After": "5"})
        if self.inflight + n > self.config.max_queue:
            raise ApiError(
                503,
                "overloaded",
                f"{self.inflight} items are being classified and this request adds {n}: over the limit of "
                f"{self.config.max_queue} (--max-queue); retry shortly",
                {"Retry-After": "1"},
            )
        self.inflight += n
        self.metrics.queue_depth.set(self.inflight)

    def release(self, n: int) -> None:
        self.inflight -= n
        self.metrics.queue_depth.set(self.inflight)

    def top_k(self, value) -> int:
        if value is None or value == "":
            return min(DEFAULT_TOP_K, self.num_classes)
        k = None
        if isinstance(value, int) and not isinstance(value, bool):
            k = value
        elif isinstance(value, str) and len(value) <= 32:  # a form's decimal text; a float (1e400 is inf) never
            try:
                k = int(value)
            except ValueError:
                pass
            if k is not None and str(k) != value.strip():  # "+3", "3_0", non-ASCII digits
                k = None
        if k is None:
            raise ApiError(422, "bad_top_k", f"top_k must be an integer; got {_show(value)}")
        if not 1 <= k <= self.num_classes:
            raise ApiError(422, "bad_top_k", f"top_k must be in 1..{self.num_classes} (the classes); got {k}")
        return k

    def min_confidence(self, value) -> float | None:
        """A request's min_confidence: None when absent, else a number in (0, 1] (a form sends it as text)."""
        from prodfuse.modeling.hierarchy import check_min_confidence

        if value is None or value == "":
            return None
        if self.hierarchy is None:
            raise ApiError(422, "no_hierarchy", self._no_hierarchy())
        p = value
        if isinstance(value, str) and len(value) <= 32:
            try:
                p = float(value)
            except ValueError:
                pass
        try:
            return check_min_confidence(p)
        except ValueError:
            raise ApiError(
                422, "bad_min_confidence", f"min_confidence must be a number in (0, 1]; got {_show(value)}"
            ) from None

    def _no_hierarchy(self) -> str:
        return (
            "min_confidence backs off along a category hierarchy, and this model has none (trained without "
            "--label-cols)"
        )

    def texts(self, fields: dict, allowed_extra: tuple[str, ...]) -> dict:
        if "min_confidence" in fields and self.hierarchy is None:
            raise ApiError(422, "no_hierarchy", self._no_hierarchy())
        allowed_extra = tuple(allowed_extra) + (("min_confidence",) if self.hierarchy is not None else ())
        unknown = sorted(set(fields) - set(self.text_fields) - set(allowed_extra))
        if unknown:
            accepted = ", ".join(list(allowed_extra) + self.text_fields)
            raise ApiError(422, "unknown_field", f"unknown field(s) {_show(unknown)}; this model accepts: {accepted}")
        out = {}
        limit = self.config.max_text_chars
        for c in self.text_fields:
            v = fields.get(c)
            if v is not None and not isinstance(v, str):
                raise ApiError(422, "bad_field", f"{c!r} must be text; got {type(v).__name__}")
            if v is not None and len(v) > limit:  # bounded per item, so admission by items bounds the work too
                raise ApiError(
                    422, "text_too_long", f"{c!r} has {len(v)} characters, over the limit of {limit} (--max-text-chars)"
                )
            out[c] = v or ""
        return out

    async def item(self, data: bytes | None, texts: dict, top_k: int, min_confidence: float | None = None) -> dict:
        """Classify one item (ApiError when it cannot be), counted by outcome in the metrics."""
        try:
            out = await self._item(data, texts, top_k, min_confidence)
        except ApiError as e:
            self.metrics.items.labels(e.error).inc()
            raise
        self.metrics.items.labels("ok").inc()
        return out

    async def _item(self, data: bytes | None, texts: dict, top_k: int, min_confidence: float | None = None) -> dict:
        """Decode and OCR the item's photo (if any), then wait for its place in a model batch."""
        started = time.perf_counter()
        timings = {}
        if data is None and not any(t.strip() for t in texts.values()):
            fields = " or ".join(["image"] + self.text_fields)
            raise ApiError(422, "empty_item", f"an item needs an image or text; give {fields}")
        if data is not None and len(data) > self.config.max_upload_bytes:
            raise ApiError(413, "upload_too_large", _too_large(len(data), self.config.max_upload_bytes))
        path, decoded, ocr_text = None, None, ""
        loop = asyncio.get_running_loop()
        try:
            if data is not None:
                t = time.perf_counter()
                path, sha = await loop.run_in_executor(self.decode, save_upload, data, self.tmp)
                try:
                    decoded, megapixels = await loop.run_in_executor(
                        self.decode,
                        decode_upload,
                        path,
                        self.predictor.image_size,
                        self.predictor.views,
                        self.predictor.crop_scale,
                    )
                except ImageRejected as e:
                    raise ApiError(422, e.reason, e.detail) from None
                timings["decode"] = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                try:
                    ocr_text = await self.pool.read(path, sha, self.config.ocr_deadline(megapixels))
                except OcrWorkerDied as e:
                    raise ApiError(503, "ocr_worker_died", str(e), {"Retry-After": "1"}) from None
                except OcrTimeout as e:
                    raise ApiError(503, "ocr_timeout", str(e), {"Retry-After": "1"}) from None
                timings["ocr"] = (time.perf_counter() - t) * 1000
            (result, model_ms), queued = await self.batcher.submit((decoded, texts, ocr_text, top_k))
        finally:
            remove(path)
        if result["error"] is not None:
            reason = "no_image" if result["error"].startswith("no image") else "unprocessable"
            raise ApiError(422, reason, result["error"])
        timings.update(queue=queued * 1000, model=model_ms, total=(time.perf_counter() - started) * 1000)
        return {
            "top_k": [{"label": lb, "probability": p} for lb, p in zip(result["labels"][:top_k], result["probs"])],
            # the batch's model call gives each item's whole path; its own min_confidence cuts it (a prefix)
            **({"path": back_off(result["path"], min_confidence)} if "path" in result else {}),
            "ocr_text": result["ocr_text"],
            "contributions": {"image": result["image_contribution"], "text": result["text_contribution"]},
            "model": {"name": self.run.path.name, "fingerprint": self.run.fingerprint},
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            **({"similar": result["similar"]} if "similar" in result else {}),
        }

    async def item_or_error(self, job: tuple | ApiError) -> dict:
        """A batch item's result, or its error as {"error", "detail", "status"}."""
        if isinstance(job, ApiError):  # refused while parsing the request
            self.metrics.items.labels(job.error).inc()
            return {"error": job.error, "detail": job.detail, "status": job.status}
        try:
            return await self.item(*job)
        except ApiError as e:
            return {"error": e.error, "detail": e.detail, "status": e.status}

    def model_info(self) -> dict:
        run, settings = self.run, self.run.extraction.get("settings", {})
        encoders = self.run.extraction.get("encoders", {})
        model_file = run.path / "model.keras"
        return {
            "name": run.path.name,
            "fingerprint": run.fingerprint,
            "labels": run.classes,
            **({"levels": list(self.hierarchy.levels)} if self.hierarchy is not None else {}),
            "inputs": run.inputs,
            "text_fields": self.text_fields,
            "backbone": settings.get("backbone"),
            "weights": _weights_name(settings.get("weights")),
            "image_size": self.predictor.image_size,
            "views": self.predictor.views,
            "text_encoder": (encoders.get("text") or {}).get("kind") or settings.get("text_encoder"),
            "ocr_engine": self.predictor.ocr_engine,
            "fusion": (run.config.get("train") or {}).get("fusion"),
            "temperature": run.temperature,
            "calibrated": run.calibrated,
            "metrics": {k: v for k, v in run.metrics.items() if k != "model_sha256"},
            "created": datetime.datetime.fromtimestamp(model_file.stat().st_mtime, datetime.timezone.utc).isoformat(),
            "index": None
            if self.index is None
            else {"space": self.index.space, "count": len(self.index), "name": Path(self.index.path).name},
            "limits": {
                "max_upload_mb": self.config.max_upload_mb,
                "max_items": self.config.max_items,
                "max_batch": self.config.max_batch,
                "max_text_chars": self.config.max_text_chars,
                "ocr_timeout_s_per_megapixel": self.config.ocr_timeout,
            },
        }


def _weights_name(weights) -> str | None:
    """The backbone weights as a kind ("imagenet", none, the random fallback) or a file name: never the server's
    path to the file."""
    if not isinstance(weights, str) or ("/" not in weights and "\\" not in weights):
        return weights
    return Path(weights.replace("\\", "/")).name


def _names_only(value):
    """The model card's facts with every absolute path cut to its file or folder name: a client learns which catalog
    and shards a run came from, never where they lie on the server."""
    if isinstance(value, dict):
        return {k: _names_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_names_only(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or value[1:3] in (":\\", ":/")):
        return _weights_name(value)
    return value


# -------------------------------------------------------------------------------------------------- app


def _request_bodies(service: Service) -> tuple[dict, dict]:
    """The OpenAPI request bodies of /v1/predict and /v1/predict/batch for this run and these limits: its text
    fields, its classes (top_k), --max-text-chars and --max-items; a field the service refuses is not in them."""
    config = service.config
    top_k = {"type": "integer", "minimum": 1, "maximum": service.num_classes}
    texts = {
        c: {"type": "string", "maxLength": config.max_text_chars, "description": "a text column of the run"}
        for c in service.text_fields
    }
    photo = {"type": "string", "format": "binary", "description": "the product photo: " + ", ".join(ALLOWED_FORMATS)}
    # only a run with a category hierarchy takes min_confidence (others refuse it, so their schema lacks it)
    confidence = (
        {
            "min_confidence": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 1,
                "description": "the answered path stops at the deepest level whose probability is at least this",
            }
        }
        if service.hierarchy is not None
        else {}
    )
    predict = {
        "type": "object",
        "description": "an image, a non-blank text field, or both",
        "properties": {
            "image": photo,
            **texts,
            "top_k": {**top_k, "default": min(DEFAULT_TOP_K, service.num_classes)},
            **confidence,
        },
        "additionalProperties": False,
    }
    fields = ", ".join(["image_base64", *service.text_fields, *service.options])
    # A batch item's own mistake is answered in its place in `results` ({"error", "detail", "status"}) and the other
    # items are classified: so the schema leaves an item open, and says what it takes.
    item = {"description": f"an object of {fields} (as /v1/predict's fields; the photo as base64)"}
    batch_form = {
        "type": "object",
        "properties": {
            "images": {"type": "array", "items": photo, "description": f"at most {config.max_items} (--max-items)"},
            "items": {
                "type": "string",
                "description": 'JSON list: [{"image": 0, "title": "..."}, {"title": "..."}]; "image" is an index '
                "into images. Without it, one item per image. An item's own mistake is answered in its place.",
            },
            "top_k": top_k,
            **confidence,
        },
        "additionalProperties": False,
    }
    batch_json = {
        "type": "object",
        "required": ["items"],
        "properties": {
            # more than --max-items is 413 (a limit, not a malformed request), so no maxItems here
            "items": {"type": "array", "items": item, "minItems": 1, "description": f"at most {config.max_items}"},
            "top_k": {**top_k, "type": ["integer", "null"]},  # null: the default
            **{k: {**v, "type": ["number", "null"]} for k, v in confidence.items()},
        },
        "additionalProperties": False,
    }
    return (
        {"content": {"multipart/form-data": {"schema": predict}}},
        {"content": {"multipart/form-data": {"schema": batch_form}, "application/json": {"schema": batch_json}}},
    )


_ERROR_BODY = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["error", "detail"],
}
_WHY = {
    400: "a body that is not the multipart form (or form) it claims to be",
    401: "no key, or a wrong one, in 'Authorization: Bearer KEY' (when the service has a key)",
    413: "the body, a photo or the number of items is over its limit (--max-upload-mb, --max-items)",
    422: "a bad field, text, top_k, JSON or photo: `error` names the reason, `detail` says what to change",
    503: "not ready, overloaded, or an OCR worker died or timed out: retry after Retry-After seconds",
}
_READY_BODY = {
    "type": "object",
    "properties": {"status": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["status", "detail"],
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` for these error answers: each a JSON {"error", "detail"}."""
    return {
        status: {
            "description": _WHY[status],
            "content": {"application/json": {"schema": _ERROR_BODY}},
            **({"headers": _RETRY_AFTER} if status == 503 else {}),
        }
        for status in statuses
    }


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    """The service for `config.run` (or an already loaded `predictor` of it). Ready once the model, backbone
    and OCR workers are loaded and one item went through (`GET /health/ready`)."""
    predictor = predictor or Predictor.from_run(config.run, trust_pickle=config.trust_pickle)
    service = Service(config, predictor)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        loading = asyncio.create_task(service.start())  # live at once, ready when loaded
        try:
            yield
        finally:
            loading.cancel()
            await service.stop()

    app = FastAPI(
        title="prodfuse",
        version="1",
        summary="Classify a product from its photo and title.",
        lifespan=lifespan,
    )
    app.state.service = service
    single = config.max_upload_bytes + FORM_SLACK
    batch = _item_bytes(config) * config.max_items
    app.add_middleware(_LimitBody, limit_for=lambda path: batch if path == "/v1/predict/batch" else single)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e.status, e.error, e.detail, e.headers)

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(request, e):
        return _error_response(413, "upload_too_large", str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        reason = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "error")
        return _error_response(e.status_code, reason, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("internal error on %s", request.url.path)  # the trace goes to the log, never to the client
        # The server drops the connection after an unhandled error: say so, so a keep-alive client opens a new one
        # instead of finding this one dead on its next request.
        headers = {"Connection": "close"}
        return _error_response(500, "internal", "internal error; the server log has the details", headers)

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        if service.key is not None and path not in PUBLIC and not _authorised(request, service.key):
            response = _error_response(
                401, "unauthorized", "send the key as 'Authorization: Bearer KEY'", {"WWW-Authenticate": "Bearer"}
            )
        else:
            response = await call_next(request)
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("prodfuse.serving").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get(
        "/health/ready",
        responses={
            503: {
                "description": "loading, or the model could not be loaded (the server log says why)",
                "content": {"application/json": {"schema": _READY_BODY}},
                "headers": _RETRY_AFTER,
            }
        },
    )
    async def ready():
        if service.ready:
            return {"status": "ready", "model": service.run.path.name}
        detail = service.load_error or "loading"  # load_error names the kind of error only, never a server path
        return JSONResponse({"status": "not_ready", "detail": detail}, status_code=503, headers={"Retry-After": "5"})

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_errors(401)},
    )
    async def metrics():
        """The Prometheus text exposition format."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/model", responses=_errors(401))
    async def model():
        return {**service.model_info(), "card": _names_only(model_card(service.run.path))}

    predict_body, batch_body = _request_bodies(service)

    @app.post("/v1/predict", openapi_extra={"requestBody": predict_body}, responses=_errors(400, 401, 413, 422, 503))
    async def predict(request: Request):
        """One product: multipart `image` (a file) and/or the run's text fields (`title`, `description`), `top_k`."""
        form = await request.form(max_files=2, max_fields=64)
        try:
            images = form.getlist("image")
            if len(images) > 1:
                raise ApiError(422, "bad_field", f"one 'image' per request; got {len(images)} (see /v1/predict/batch)")
            if images and not isinstance(images[0], UploadFile):
                raise ApiError(422, "bad_field", "'image' must be a file upload (multipart/form-data)")
            fields = {k: v for k, v in form.multi_items() if k != "image"}
            texts = service.texts(fields, ("image", "top_k"))
            k = service.top_k(fields.get("top_k"))
            min_confidence = service.min_confidence(fields.get("min_confidence"))
            data = await images[0].read() if images else None
        finally:
            await form.close()
        service.admit(1)
        try:
            return await service.item(data, texts, k, min_confidence)
        finally:
            service.release(1)

    @app.post(
        "/v1/predict/batch", openapi_extra={"requestBody": batch_body}, responses=_errors(400, 401, 413, 422, 503)
    )
    async def predict_batch(request: Request):
        """Several products: multipart `images` + a JSON `items` field, or a JSON body with base64 images. One
        result or one error ({"error", "detail", "status"}) per item, in order."""
        jobs = await _batch_jobs(request, service)
        service.admit(len(jobs))
        try:
            results = await asyncio.gather(*(service.item_or_error(job) for job in jobs))
        finally:
            service.release(len(jobs))
        return {"results": results}

    return app


def _authorised(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _batch_jobs(request: Request, service: Service) -> list[tuple | ApiError]:
    """(bytes or None, texts, top_k) per item of a batch request, or an ApiError for the whole request; an
    item's own bad value (bad base64, a missing image index) becomes that item's error."""
    limit = service.config.max_items
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        raw = await request.body()
        size = len(raw)
        body = _json(raw, "the body")
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise ApiError(422, "bad_json", 'the body must be {"items": [...], "top_k": K}')
        if "min_confidence" in body and service.hierarchy is None:
            raise ApiError(422, "no_hierarchy", service._no_hierarchy())
        unknown = sorted(set(body) - {"items", *service.options})
        if unknown:
            accepted = ", ".join(["items", *service.options])
            raise ApiError(422, "unknown_field", f"unknown field(s) {_show(unknown)}; accepted: {accepted}")
        items, images = body["items"], None
        default_k = body.get("top_k")
        default_confidence = body.get("min_confidence")
    else:
        form = await request.form(max_files=limit + 1, max_fields=64)
        try:
            if "min_confidence" in form and service.hierarchy is None:
                raise ApiError(422, "no_hierarchy", service._no_hierarchy())
            unknown = sorted(set(form) - {"images", "items", *service.options})
            if unknown:
                accepted = ", ".join(["images", "items", *service.options])
                raise ApiError(422, "unknown_field", f"unknown field(s) {_show(unknown)}; accepted: {accepted}")
            files = form.getlist("images")
            if any(not isinstance(f, UploadFile) for f in files):
                raise ApiError(422, "bad_field", "'images' must be file uploads (multipart/form-data)")
            if len(files) > limit:
                raise ApiError(413, "too_many_items", f"{len(files)} images; at most {limit} per request (--max-items)")
            images = [await f.read() for f in files]
            raw = form.get("items")
            default_k = form.get("top_k")
            default_confidence = form.get("min_confidence")
        finally:
            await form.close()
        size = sum(map(len, images)) + len(raw if isinstance(raw, str) else "")
        if raw is None:
            items = [{"image": i} for i in range(len(images))]
        else:
            items = _json(raw, "'items'")
            if not isinstance(items, list):
                raise ApiError(422, "bad_json", "'items' must be a JSON list of objects")
    if not items:
        raise ApiError(422, "empty_batch", "the request holds no item")
    if len(items) > limit:
        raise ApiError(413, "too_many_items", f"{len(items)} items; at most {limit} per request (--max-items)")
    # The body limit before parsing is for the largest batch (--max-items); a request of fewer items gets as many
    # bytes as it has items, so a few items cannot carry the whole batch's allowance of text or photos.
    allowed = _item_bytes(service.config) * len(items)
    if size > allowed:
        raise ApiError(
            413,
            "upload_too_large",
            f"the request carries {size} bytes for {len(items)} item(s), over {allowed} "
            f"({_item_bytes(service.config)} per item: --max-upload-mb as base64, and the text fields)",
        )
    k_default = service.top_k(default_k)
    confidence_default = service.min_confidence(default_confidence)
    return [_batch_item(item, images, service, k_default, confidence_default) for item in items]


def _item_bytes(config: ServeConfig) -> int:
    """Bytes a batch request may carry per item: a photo of --max-upload-mb as base64 (4/3 larger), and room for
    its text fields and the form's or the JSON's own bytes."""
    return config.max_upload_bytes * 4 // 3 + FORM_SLACK


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json(data: bytes | str, what: str):
    """Standard JSON (no NaN or Infinity), or ApiError 422 naming `what`: never a RecursionError from nesting."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(422, "bad_json", f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, "bad_json", f"{what} is not JSON: {_show(str(e))}") from None


def _batch_item(
    item, images: list[bytes] | None, service: Service, k_default: int, confidence_default: float | None = None
) -> tuple | ApiError:
    """One job (data, texts, top_k, min_confidence), or the item's own error."""
    try:
        if not isinstance(item, dict):
            raise ApiError(422, "bad_item", f"an item must be a JSON object; got {type(item).__name__}")
        image_key = "image_base64" if images is None else "image"
        options = (image_key, *service.options)
        texts = service.texts({k: v for k, v in item.items() if k not in options}, (image_key, "top_k"))
        k = service.top_k(item["top_k"]) if "top_k" in item else k_default
        min_confidence = (
            service.min_confidence(item["min_confidence"]) if "min_confidence" in item else confidence_default
        )
        ref, data = item.get(image_key), None
        if ref is not None and images is None:
            if not isinstance(ref, str):
                raise ApiError(422, "bad_base64", "image_base64 must be a base64 string")
            try:
                data = decode_base64(ref)
            except (binascii.Error, ValueError) as e:
                raise ApiError(422, "bad_base64", f"image_base64 is not valid base64: {e}") from None
        elif ref is not None:
            if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(images):
                raise ApiError(422, "bad_image_index", f"'image' must index the {len(images)} images; got {_show(ref)}")
            data = images[ref]
        return data, texts, k, min_confidence
    except ApiError as e:
        return e
