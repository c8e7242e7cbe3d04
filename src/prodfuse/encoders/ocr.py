"""OCR stage of embedding extraction: read the printed words on a product photo.

Each image goes through one engine (RapidOCR by default), the engine's raw
output is parsed to ``[(text, confidence 0..1), ...]`` and filtered to a single
string of confident, de-duplicated words. Results are cached on disk keyed by
the image bytes and the settings, so re-running an extraction costs nothing;
cache misses run in a pool of single-threaded worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import types
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

OCR_ENGINES = ("rapidocr", "tesseract", "easyocr", "none")

MIN_CONF = 0.5
MIN_LEN = 2
# Bump when parsing/filtering changes so stale cached texts are not reused.
CACHE_FORMAT_VERSION = 2

# rapidocr 3.x ships PP-OCRv6's small multilingual detection and recognition models inside its wheel (its other
# models download, which fails offline): prodfuse loads these two files by path, so nothing is ever fetched.
RAPIDOCR_MODELS = ("PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx")
_RAPIDOCR_LANGS = ("multi",)
_DEFAULT_LANGS = {
    "rapidocr": _RAPIDOCR_LANGS,
    "tesseract": ("eng",),
    "easyocr": ("ch_sim", "en"),
    "none": (),
}
_ENGINE_PACKAGES = {
    "rapidocr": "rapidocr",
    "tesseract": "pytesseract",
    "easyocr": "easyocr",
}
# Set in each worker before any engine library loads, so BLAS/OpenMP/torch
# pools stay at one thread and N workers use N cores, not N * cores.
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_THREAD_LIMIT",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

Words = list[tuple[str, float]]


class OcrStopped(RuntimeError):
    """``ocr_images`` was asked to stop (its ``stop`` event was set) before every image was read."""


class OcrResult(NamedTuple):
    """OCR outcome of one image: filtered text, whether it came from the cache, error or None."""

    text: str
    cached: bool
    error: str | None


# --------------------------------------------------------------------------- filter


def _strip_punct(word: str) -> str:
    """Strip leading/trailing punctuation and symbols (Unicode P* and S*: ``"®`` , ``，`` ...)."""

    def is_punct(ch: str) -> bool:
        return unicodedata.category(ch)[0] in "PS"

    start, end = 0, len(word)
    while start < end and is_punct(word[start]):
        start += 1
    while end > start and is_punct(word[end - 1]):
        end -= 1
    return word[start:end]


def filter_words(words: Iterable[tuple[str, float]], min_conf: float = MIN_CONF, min_len: int = MIN_LEN) -> str:
    """Join confident words (conf > min_conf, len >= min_len) in reading order, de-duplicated case-insensitively.

    ``words`` are detected lines ``(text, conf01)``; each line is split on
    whitespace and every word inherits the line's confidence.
    """
    seen: set[str] = set()
    kept: list[str] = []
    for line, conf in words:
        if not float(conf) > min_conf:
            continue
        for raw in str(line).split():
            word = _strip_punct(raw)
            if len(word) < min_len:
                continue
            key = word.casefold()
            if key in seen:
                continue
            seen.add(key)
            kept.append(word)
    return " ".join(kept)


# --------------------------------------------------------------------------- parsers


def parse_rapidocr(result: Any) -> Words:
    """RapidOCR output -> [(text, score)]: 3.x's ``RapidOCROutput`` (``txts``, ``scores``), or 1.4's ``(result,
    elapse)`` tuple or result list."""
    if hasattr(result, "txts"):
        return [(str(t), float(c)) for t, c in zip(result.txts or (), result.scores or ())]
    if isinstance(result, tuple):  # the engine returns (result, elapse); result itself is a list
        result = result[0]
    if not result:
        return []
    return [(str(item[1]), float(item[2])) for item in result]


def parse_tesseract(data: dict) -> Words:
    """pytesseract ``image_to_data(..., output_type=Output.DICT)`` -> [(word, conf/100)], non-words (conf -1) dropped."""
    out: Words = []
    for text, conf in zip(data.get("text", []), data.get("conf", [])):
        conf = float(conf)  # int, float or str depending on the pytesseract/tesseract version
        text = str(text).strip()
        if conf < 0 or not text:
            continue
        out.append((text, conf / 100.0))
    return out


def parse_easyocr(output: Iterable[Sequence[Any]]) -> Words:
    """easyocr ``reader.readtext(img)`` list of ``(box, text, confidence)`` -> [(text, confidence)]."""
    return [(str(item[1]), float(item[2])) for item in output]


# --------------------------------------------------------------------------- settings


def _split_langs(langs: str | Sequence[str] | None) -> tuple[str, ...]:
    if langs is None:
        return ()
    tokens = langs.split(",") if isinstance(langs, str) else list(langs)
    out: list[str] = []
    for tok in tokens:
        tok = str(tok).strip().lower()
        if tok and tok not in out:
            out.append(tok)
    return tuple(out)


def resolve_langs(engine: str, langs: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate ``engine`` and a comma-list of languages; None/"" -> the engine's default."""
    if engine not in OCR_ENGINES:
        raise ValueError(f"Unknown OCR engine {engine!r}; use one of {', '.join(OCR_ENGINES)}.")
    parsed = _split_langs(langs)
    if engine == "none":
        return ()  # nothing is read, so languages do not matter
    if not parsed:
        return _DEFAULT_LANGS[engine]
    for tok in parsed:
        if not tok.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"Bad OCR language code {tok!r} in {langs!r}; pass a comma list such as 'eng' or 'ch_sim,en'."
            )
    if engine == "rapidocr":
        if set(parsed) != set(_RAPIDOCR_LANGS):
            raise ValueError(
                f"rapidocr reads with its built-in multilingual PP-OCRv6 models, got languages {langs!r}; "
                "omit --ocr-lang (or pass 'multi'), or use --ocr tesseract/easyocr to choose languages."
            )
        return _RAPIDOCR_LANGS
    return parsed


def default_cache_dir() -> Path:
    """``$PRODFUSE_CACHE/ocr`` if that variable is set, else ``~/.cache/prodfuse/ocr``."""
    root = os.environ.get("PRODFUSE_CACHE")
    if root:
        return Path(root).expanduser() / "ocr"
    return Path.home() / ".cache" / "prodfuse" / "ocr"


@functools.lru_cache(maxsize=None)  # read once per process: it is part of every cache key
def _engine_version(engine: str) -> str | None:
    pkg = _ENGINE_PACKAGES.get(engine)
    if pkg is None:
        return None
    from importlib import metadata

    try:
        version = metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
    if engine == "tesseract":  # the binary does the reading, so record its version too
        try:
            import pytesseract

            version = f"{version} (tesseract {pytesseract.get_tesseract_version()})"
        except Exception:  # binary missing: the package version is still worth recording
            pass
    return version


def engine_models(engine: str) -> list[str]:
    """The model files an engine reads with (recorded, and part of the OCR cache key)."""
    return list(RAPIDOCR_MODELS) if engine == "rapidocr" else []


def ocr_settings(engine: str, langs: str | Sequence[str] | None) -> dict:
    """Settings recorded in the extraction manifest (engine, langs, filter, engine package version, models)."""
    return {
        "engine": engine,
        "langs": list(resolve_langs(engine, langs)),
        "min_conf": MIN_CONF,
        "min_len": MIN_LEN,
        "version": _engine_version(engine),
        "models": engine_models(engine),
        "cache_format": CACHE_FORMAT_VERSION,
    }


# --------------------------------------------------------------------------- cache


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(image_sha: str, engine: str, langs: tuple[str, ...]) -> str:
    """The cache entry of one image read by one engine: the engine's package version and model files are part of
    it, so texts of two versions (PP-OCRv4 and v6, say) never mix; entries of another version are simply missed."""
    spec = {
        "v": CACHE_FORMAT_VERSION,
        "image": image_sha,
        "engine": engine,
        "version": _engine_version(engine),
        "models": engine_models(engine),
        "langs": list(langs),
        "min_conf": MIN_CONF,
        "min_len": MIN_LEN,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"  # fan out so no directory holds 100k files


def _cache_read(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["text"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: treat as a miss and recompute


def _cache_write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # tmp file in the same directory + os.replace: readers see the old file or the whole new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- engines


def _load_rgb(path: str):
    """Decode fully (so truncated files fail here), apply EXIF rotation, convert to RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def _make_engine(engine: str, langs: tuple[str, ...]) -> Callable[[str], Words]:
    """Build ``engine`` once; return a function image path -> [(text, conf01)]."""
    if engine == "rapidocr":
        from rapidocr import RapidOCR

        det, rec = rapidocr_model_paths()
        # One onnxruntime thread: parallelism comes from worker processes.
        # No angle classifier: packshots are upright and it costs time.
        reader = RapidOCR(
            params={
                "Global.use_cls": False,
                "Global.log_level": "error",
                "EngineConfig.onnxruntime.intra_op_num_threads": 1,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                "Det.model_path": str(det),
                "Rec.model_path": str(rec),
            }
        )
        return lambda path: parse_rapidocr(reader(_load_rgb(path)))
    if engine == "tesseract":
        import pytesseract

        lang = "+".join(langs)
        return lambda path: parse_tesseract(
            pytesseract.image_to_data(_load_rgb(path), lang=lang, output_type=pytesseract.Output.DICT)
        )
    if engine == "easyocr":
        import numpy as np

        try:
            import easyocr  # optional extra, imported only when chosen
        except ImportError as e:
            raise ImportError(
                "OCR engine 'easyocr' is not installed; install it with `pip install prodfuse[easyocr]` "
                "or choose --ocr rapidocr."
            ) from e
        reader = easyocr.Reader(list(langs), gpu=False, verbose=False)
        return lambda path: parse_easyocr(reader.readtext(np.asarray(_load_rgb(path))))
    if engine == "none":
        return lambda path: []
    raise ValueError(f"Unknown OCR engine {engine!r}; use one of {', '.join(OCR_ENGINES)}.")


def rapidocr_model_paths() -> list[Path]:
    """The PP-OCRv6 small detection and recognition models inside the installed rapidocr wheel."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or spec.origin is None:
        raise ImportError("OCR engine 'rapidocr' needs `pip install 'rapidocr>=3,<4'`.")
    paths = [Path(spec.origin).parent / "models" / name for name in RAPIDOCR_MODELS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ImportError(
            f"the installed rapidocr lacks its built-in models {missing}; reinstall it: "
            "`pip install --force-reinstall 'rapidocr>=3,<4'`."
        )
    return paths


def _check_engine(engine: str) -> None:
    """Fail once, before any image, if the engine is missing (instead of an error per image)."""
    if engine == "rapidocr":
        rapidocr_model_paths()
    elif engine == "tesseract":
        try:
            import pytesseract

            pytesseract.get_tesseract_version()
        except (ImportError, OSError) as e:  # TesseractNotFoundError is an OSError
            raise ImportError(
                "OCR engine 'tesseract' needs `pip install pytesseract` and the tesseract binary "
                f"(`apt-get install tesseract-ocr`): {e}"
            ) from e
    elif engine == "easyocr":
        import importlib.util

        if importlib.util.find_spec("easyocr") is None:
            raise ImportError(
                "OCR engine 'easyocr' is not installed; install it with `pip install prodfuse[easyocr]` "
                "or choose --ocr rapidocr."
            )


def _run_one(read: Callable[[str], Words], path: str) -> tuple[str, str | None]:
    try:
        return filter_words(read(path)), None
    except Exception as e:  # an unreadable image must not stop a whole extraction
        return "", f"{type(e).__name__}: {e}"


# In-process engines, built once per (engine, langs) and kept for later calls.
_LOCAL_ENGINES: dict[tuple[str, tuple[str, ...]], Callable[[str], Words]] = {}


def _local_engine(engine: str, langs: tuple[str, ...]) -> Callable[[str], Words]:
    key = (engine, langs)
    if key not in _LOCAL_ENGINES:
        _LOCAL_ENGINES[key] = _make_engine(engine, langs)
    return _LOCAL_ENGINES[key]


# Per worker process state (spawned workers share nothing with the parent).
_WORKER_READ: Callable[[str], Words] | None = None
_WORKER_INIT_ERROR: str | None = None


def _worker_init(engine: str, langs: tuple[str, ...], parent: int | None = None) -> None:
    global _WORKER_READ, _WORKER_INIT_ERROR
    # A terminal's Ctrl-C goes to the whole process group: workers ignore it (no KeyboardInterrupt traceback,
    # no worker dead while the parent still sends it images); the parent stops them with kill().
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        _exit_with_parent(parent)
    for name in _THREAD_ENV:
        os.environ[name] = "1"
    try:
        if engine == "easyocr":
            import torch

            torch.set_num_threads(1)
        _WORKER_READ = _make_engine(engine, langs)
    except Exception as e:
        # Raising here would make the pool respawn workers forever; report it from the first task.
        _WORKER_INIT_ERROR = f"{type(e).__name__}: {e}"


def _exit_with_parent(parent: int) -> None:
    """End this worker when `parent` (the process that started it) ends, even by SIGKILL, which gives the parent
    no chance to stop its workers: an orphaned worker would hold its memory (and the multiprocessing resource
    tracker, which waits for every holder of its pipe) for ever.

    Linux delivers SIGKILL on the parent's death (PR_SET_PDEATHSIG; it fires when the parent *thread* that started
    the worker ends, and every starter here outlives its workers: extraction's OCR thread, the service's threads).
    A watchdog thread covers other systems: an orphan is adopted by another process, so its parent pid changes.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl in this libc: the watchdog alone
            pass
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="prodfuse-ocr-parent-watch", daemon=True).start()


def _worker_task(job: tuple[int, str]) -> tuple[int, str, str | None]:
    index, path = job
    if _WORKER_READ is None:
        raise RuntimeError(f"OCR engine failed to start in a worker process: {_WORKER_INIT_ERROR}")
    text, error = _run_one(_WORKER_READ, path)
    return index, text, error


def _worker_serve(conn) -> None:
    """A worker's loop: ``(function, args)`` in over its own pipe, ``("ok", result)`` or ``("raise", message)``
    out, until the parent closes the pipe."""
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
        except Exception as e:
            reply = ("raise", f"{type(e).__name__}: {e}")
        conn.send(reply)


def _loaded_modules(names: Sequence[str]) -> list[str]:
    """Which of ``names`` a worker has imported (tests check TensorFlow stays out)."""
    return [n for n in names if n in sys.modules]


# Workers load this file as a top-level module under this name, not as
# prodfuse.encoders.ocr: importing the prodfuse package would pull in TensorFlow
# (prodfuse/__init__ registers the Keras layers), costing each worker seconds
# and hundreds of MB for nothing. This file imports only the stdlib at the top.
_WORKER_MODULE = "_prodfuse_ocr_worker"
_WORKER_BOOTSTRAP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location(name, path)
mod = importlib.util.module_from_spec(spec)
sys.modules[name] = mod
spec.loader.exec_module(mod)
mod._worker_init(engine, langs, parent)
"""
_PIPE_BOOTSTRAP = _WORKER_BOOTSTRAP + "mod._worker_serve(conn)\n"
_MAIN_SWAP_LOCK = threading.Lock()


def _standalone_module() -> types.ModuleType:
    """This file as ``_prodfuse_ocr_worker`` in this process, so tasks pickle by that name."""
    mod = sys.modules.get(_WORKER_MODULE)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_WORKER_MODULE, __file__)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_WORKER_MODULE] = mod
        spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _blank_main():
    """Hide ``__main__`` while workers start: spawn re-runs it in every worker otherwise
    (the prodfuse CLI imports TensorFlow), and the workers need nothing from it."""
    with _MAIN_SWAP_LOCK:
        real = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # no __spec__/__file__: nothing to re-run
        try:
            yield
        finally:
            sys.modules["__main__"] = real


def _start_worker(engine: str, langs: tuple[str, ...]):
    """One 'spawn' process (forking a parent with TensorFlow loaded is unsafe) of single-threaded OCR that serves
    jobs over a pipe of its own, and the parent's end of that pipe.

    Each worker has its own pipe, not a share of one task queue, so the parent can kill any worker at any time:
    a multiprocessing.Pool's idle workers wait holding the queue's lock, and Pool.terminate() could hang on one
    whose SIGTERM landed on an OCR engine thread instead of the main one."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    ns = {"name": _WORKER_MODULE, "path": os.path.abspath(__file__), "engine": engine, "langs": langs, "conn": child}
    ns["parent"] = os.getpid()  # the worker exits when this process dies (see _exit_with_parent)
    proc = ctx.Process(target=exec, args=(_PIPE_BOOTSTRAP, ns), daemon=True, name="prodfuse-ocr")
    with _blank_main():
        proc.start()
    child.close()  # so the parent's end reads EOF once the worker dies
    return proc, parent


def _stop_workers(workers) -> None:
    """Kill and reap: OCR workers hold nothing the parent needs (results are cached by the parent)."""
    for proc, conn in workers:
        proc.kill()
        conn.close()
    for proc, _ in workers:
        proc.join()


def open_executor(engine: str, langs: str | Sequence[str] | None, workers: int):
    """A started ``concurrent.futures.ProcessPoolExecutor`` of ``workers`` single-threaded OCR processes (the
    same workers as extraction's pool), and ``read(path) -> (index, text, error)`` to submit to it. For a long-
    lived caller (the service): a worker that dies breaks this executor; the caller opens a new one.

    Every worker is started here, in the calling thread, before this returns (the executor would otherwise start
    them one per submit, later, from whatever thread submits): so each is started with ``__main__`` hidden, its
    engine is loaded before the first photo (whose OCR deadline must not pay for it), and it dies with the
    process that called this (see _exit_with_parent)."""
    import concurrent.futures
    import multiprocessing as mp

    langs_t = resolve_langs(engine, langs)
    _check_engine(engine)
    ns = {"name": _WORKER_MODULE, "path": os.path.abspath(__file__), "engine": engine, "langs": langs_t}
    ns["parent"] = os.getpid()
    mod = _standalone_module()
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=exec, initargs=(_WORKER_BOOTSTRAP, ns)
    )
    with _blank_main():  # a submit with no idle worker starts one: `workers` submits at once start them all
        for started in [executor.submit(mod._loaded_modules, ()) for _ in range(workers)]:
            started.result()
    return executor, mod._worker_task


def cache_lookup(image_sha: str, engine: str, langs: str | Sequence[str] | None, cache_dir=None):
    """(cache file, cached text or None) for an image's sha256 under these settings: the cache ``ocr_images``
    reads and writes, so the service and extraction share results."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    langs_t = resolve_langs(engine, langs)
    path = _cache_path(cache, _cache_key(image_sha, engine, langs_t))
    return path, _cache_read(path)


def cache_store(path: Path, text: str, image_sha: str, engine: str, langs: str | Sequence[str] | None) -> None:
    """Record a successful read at ``path`` (from ``cache_lookup``)."""
    _cache_write(
        path, {"text": text, "engine": engine, "langs": list(resolve_langs(engine, langs)), "image_sha256": image_sha}
    )


# --------------------------------------------------------------------------- driver


def iter_ocr(
    paths: Sequence[str],
    engine: str = "rapidocr",
    langs: str | Sequence[str] | None = None,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> Iterator[tuple[int, OcrResult]]:
    """Yield ``(index, OcrResult)`` for every path, cache hits first, then misses as they finish.

    Safe to consume from a background thread. Misses run in ``workers``
    spawned processes (default os.cpu_count()); workers <= 1 runs in-process.
    Workers import neither prodfuse nor the caller's ``__main__`` (see _start_worker).
    Once ``stop`` is set the generator ends early: it checks between images and
    every 0.2 s, then kills the worker processes. Results cached so far are kept.
    A worker that dies reading an image (a crash in the engine) fails that image
    and is replaced.
    """
    from prodfuse.progress import progress_bar

    langs_t = resolve_langs(engine, langs)
    paths = [str(p) for p in paths]
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError(f"ocr workers must be >= 0, got {workers}; use 0 or 1 for in-process OCR.")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    bar = progress_bar(len(paths), "OCR", "img", enabled=progress)
    try:
        if engine == "none":
            for i in range(len(paths)):
                bar.update(1)
                yield i, OcrResult("", False, None)
            return

        # Lookups in the parent: hashing is cheap, and hits never start an engine.
        # Identical images (same key) in one batch are read once.
        pending: dict[str, list[int]] = {}
        jobs: list[tuple[int, str]] = []
        shas: dict[str, str] = {}
        for i, path in enumerate(paths):
            if stopped():
                return
            try:
                sha = _file_sha256(path)
            except OSError as e:
                bar.update(1)
                yield i, OcrResult("", False, f"{type(e).__name__}: {e}")
                continue
            key = _cache_key(sha, engine, langs_t)
            text = _cache_read(_cache_path(cache, key))
            if text is not None:
                bar.update(1)
                yield i, OcrResult(text, True, None)
                continue
            if key not in pending:
                pending[key] = []
                shas[key] = sha
                jobs.append((i, path))
            pending[key].append(i)

        if not jobs:
            return
        _check_engine(engine)
        key_of = {indices[0]: key for key, indices in pending.items()}

        def finish(i: int, text: str, error: str | None) -> Iterator[tuple[int, OcrResult]]:
            key = key_of[i]
            if error is None:  # errors are not cached: a fixed file should be retried
                cache_store(_cache_path(cache, key), text, shas[key], engine, langs_t)
            for j in pending[key]:
                bar.update(1)
                yield j, OcrResult(text, False, error)

        n_proc = min(workers, len(jobs))
        if n_proc <= 1:
            read = _local_engine(engine, langs_t)
            for i, path in jobs:
                if stopped():
                    return
                yield from finish(i, *_run_one(read, path))
            return

        from multiprocessing.connection import wait

        mod = _standalone_module()  # tasks pickle by the name the workers load this file under
        started = [_start_worker(engine, langs_t) for _ in range(n_proc)]
        free = list(started)
        busy: dict[Any, tuple[Any, tuple[int, str]]] = {}  # parent's pipe end -> (process, job)
        todo = jobs[::-1]
        try:
            while todo or busy:
                while free and todo:
                    proc, conn = free.pop()
                    job = todo.pop()
                    busy[conn] = (proc, job)
                    try:
                        conn.send((mod._worker_task, (job,)))
                    except OSError:  # died while idle: its pipe reads EOF below
                        pass
                if stopped():
                    return
                for conn in wait(list(busy), timeout=0.2):  # short waits so a stop request is seen
                    proc, (i, _path) = busy.pop(conn)
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        # The worker died (a crash inside the engine): this image fails, a new worker goes on.
                        proc.join()
                        conn.close()
                        started.append(_start_worker(engine, langs_t))
                        free.append(started[-1])
                        yield from finish(i, "", f"OCR worker died (exit code {proc.exitcode}) reading this image")
                        continue
                    if status == "raise":
                        raise RuntimeError(value)
                    free.append((proc, conn))
                    yield from finish(*value)
        finally:
            # Done, stopped, interrupted or failed: kill at once, never wait for queued images.
            _stop_workers(started)
    finally:
        bar.close()


def ocr_images(
    paths: Sequence[str],
    engine: str = "rapidocr",
    langs: str | Sequence[str] | None = None,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_result: Callable[[int, OcrResult], None] | None = None,
    stop: threading.Event | None = None,
) -> list[OcrResult]:
    """OCR every image (cached); results in input order. ``on_result(index, result)`` is called as each finishes.

    Setting ``stop`` (from another thread) ends the work early and raises OcrStopped; see iter_ocr.
    """
    results: list[OcrResult | None] = [None] * len(paths)
    for i, res in iter_ocr(paths, engine, langs, workers, cache_dir, progress, stop):
        results[i] = res
        if on_result is not None:
            on_result(i, res)
    if stop is not None and stop.is_set() and any(r is None for r in results):
        raise OcrStopped(f"OCR stopped after {sum(r is not None for r in results)} of {len(paths)} images")
    return results  # type: ignore[return-value]
