"""The `prodfuse` command: one module per subcommand, each mapping flags to a config and a config to a call.

Nothing outside this package imports it. Process-wide settings a command needs (logging, TensorFlow's log
level, the heap setting, op determinism) are made here, at the entry point, never by the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

COMMANDS = ("extract", "train", "evaluate", "predict", "compare", "tune", "align", "index", "search", "audit", "serve")
HELPS = {
    "extract": "catalog -> OCR + image/text embeddings -> parquet shards",
    "train": "shards -> fusion MLP run folder",
    "evaluate": "metrics, ablation and calibration of a run",
    "predict": "top-k labels for a new catalog or shards",
    "compare": "unimodal vs fusion models and linear probes on the same splits",
    "tune": "search the head's settings by K-fold cross-validation within a time budget",
    "align": "joint image-text space for text -> photo search",
    "index": "similarity index (image, text, fused or joint space) over shards",
    "search": "similar products to an id, a photo or words",
    "audit": "near-duplicate listings within shards or between two folders; --labels: likely mislabelled products",
    "serve": "REST service + web page: classify a product from its photo and title",
}


def _command(name: str):
    # A command module that fails to import is a broken install: show the real error, not "invalid choice".
    return importlib.import_module(f"prodfuse.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    from prodfuse.version import __version__

    parser = argparse.ArgumentParser(prog="prodfuse", description="Multimodal product classification.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name, help=HELPS[name], description=HELPS[name])
        _command(name).add_args(p)
        g = p.add_argument_group("output")
        g.add_argument("--quiet", action="store_true", help="warnings and the final summary only")
        g.add_argument("--verbose", action="store_true", help="debug messages, and TensorFlow's own log lines")
    return parser


class _Format(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def _logging_state():
    """What _setup changes in logging, to put back when main() returns (tests and notebooks call main() in-process)."""
    saved = [
        (lg, lg.handlers[:], lg.propagate, lg.level)
        for lg in (logging.getLogger("prodfuse"), logging.getLogger("py.warnings"))
    ]
    capturing = logging._warnings_showwarning is not None  # noqa: SLF001  (no public getter)

    def restore():
        for lg, handlers, propagate, level in saved:
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
        logging.captureWarnings(capturing)

    return restore


def _setup(args: argparse.Namespace) -> None:
    if not args.verbose:
        # TensorFlow's C++ start-up chatter (CUDA, CPU instruction sets, oneDNN) buries our messages; it must be
        # set before TensorFlow is first imported, which no command has done yet.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from prodfuse.allocator import keep_freed_heap_mapped

    keep_freed_heap_mapped()  # before TensorFlow starts its threads (see prodfuse.allocator)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    root = logging.getLogger("prodfuse")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    # Python warnings (Keras, PIL) go to the same place, once each, without source lines.
    logging.captureWarnings(True)
    warn = logging.getLogger("py.warnings")
    warn.handlers[:] = [handler]
    warn.propagate = False
    warn.setLevel(logging.DEBUG if args.verbose else logging.ERROR)


def _quiet_tensorflow(args: argparse.Namespace) -> None:
    """Import TensorFlow now (after the command's cheap checks), without its start-up lines and log chatter."""
    if args.verbose:
        return
    _import_tensorflow_quietly()
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 pointed at /dev/null: TensorFlow 2.21 writes its start-up lines
    (oneDNN, CUDA drivers) from C++ before its log settings apply. An import error is raised as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as a KeyboardInterrupt so it takes Ctrl-C's path: the library stops
    its workers and keeps complete work, and main prints the resume hint; main then returns 143, not 130."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.stderr_tty = sys.stderr.isatty()
    args.progress_ok = getattr(args, "progress", True) and not args.quiet
    if hasattr(args, "progress"):
        args.progress = args.progress and not args.quiet
    module = _command(args.command)
    from prodfuse.cli.common import ConfigError

    try:
        cfg = module.config(args)  # every value is checked here, before any work starts
    except ConfigError as e:
        parser.exit(2, f"prodfuse {args.command}: error: {e}\n")
    restore_logging = _logging_state()
    _setup(args)
    # The entry point (never the library) turns SIGTERM into an exception, only while the command runs and
    # only from the main thread (signal handlers can be set nowhere else); the previous handler is restored.
    on_main = threading.current_thread() is threading.main_thread()
    # Each signal also sets `stop`, which the library checks between batches: a KeyboardInterrupt that lands in
    # a finaliser (__del__, weakref callbacks) is printed and dropped by Python, and the work would go on.
    stop, received = threading.Event(), []

    def on_signal(signum, frame):
        stop.set()
        received.append(signum)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if on_main else {}
    from prodfuse.extraction.config import ExtractionStopped

    try:
        # Files, folders and columns first, from headers and JSON: a wrong path or column is reported before
        # TensorFlow's import (several seconds), which every command's work needs.
        if hasattr(module, "check"):
            module.check(cfg)
        _quiet_tensorflow(args)
        return module.run(cfg, stop)
    except ExtractionStopped:  # the library noticed `stop`
        return _interrupted(args, received)
    except KeyboardInterrupt as e:
        return _interrupted(args, [signal.SIGTERM] if isinstance(e, _Terminated) else received)
    except (ValueError, ImportError) as e:
        # Our errors say what was wrong and how to fix it (an ImportError names the extra to install); a traceback
        # would only bury that.
        if os.environ.get("PRODFUSE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        restore_logging()


def _interrupted(args: argparse.Namespace, received: list) -> int:
    term = signal.SIGTERM in received
    how, code = ("SIGTERM", 143) if term else ("Ctrl-C", 130)
    print(f"\ninterrupted ({how}). {_resume_hint(args)}", file=sys.stderr)
    return code


def _resume_hint(args: argparse.Namespace) -> str:
    if args.command == "extract":
        from prodfuse.extraction.chunks import kept_work
        from prodfuse.extraction.extract import DEMO_OUT

        out = args.out or (DEMO_OUT if args.catalog is None else None)
        if out is None:
            return "Nothing was saved; run it again."
        k = kept_work(out)
        return (
            f"Kept in {out}: {k['shards']} complete shard(s) ({k['shard_rows']} rows) and the embedded photos of "
            f"{k['checkpoint_rows']} more rows (.work/); OCR results stay in the OCR cache. Run the same command "
            f"again to resume from there."
        )
    if args.command == "tune":
        return "Finished trials are kept in the study: run the same command again to continue it."
    return "Nothing was saved for this step; run it again."


if __name__ == "__main__":
    sys.exit(main())
