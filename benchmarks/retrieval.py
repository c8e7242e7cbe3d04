"""Build time, memory per vector, queries/s and recall@10 of the retrieval index types, against exact search.

    python benchmarks/retrieval.py --sweep      # 1,000,000 vectors, and the chosen type's nprobe swept
    python benchmarks/retrieval.py --quick      # 100,000 vectors
    python benchmarks/retrieval.py --also hnsw  # also HNSW (its build takes ~15 minutes at 1M on 2 cores)

Data: seeded synthetic clustered vectors, 256-d: `--clusters` Gaussian centres of unit length, each item a random
centre plus isotropic Gaussian noise of norm `--noise` (1.0: an item's cosine to its centre is ~0.7, to another
item of its cluster ~0.5, to other clusters ~0), L2-normalised. The `--queries` held-out queries are drawn the same
way and are not in the index.

Indexes are built with `prodfuse.retrieval.index.Index.build`, so the figures are those of what prodfuse ships
(its parameters, its normalisation): `flat` (exact; the reference), the type `choose_index_type` picks for this
many vectors (ivfflat at 100k and 1M), and any `--also` types. For each:

- build:    seconds of the faiss part (the manifest's build_seconds) and of the whole `Index.build` call (adds
            normalising a copy of the vectors and checks).
- memory:   bytes per vector of the serialised faiss index (faiss.write_index to a temp file, size / n).
- QPS:      faiss `search` on the built index, k=10: batched (all queries in one call, every core) and single
            (`--single` queries, one call each, faiss on one thread). Types are measured back to back,
            interleaved (flat, ivfflat, ..., flat, ivfflat, ...), `--repeats` times; each figure is the median, with
            min-max beside it. The speed-up is QPS(type) / QPS(flat) in each mode. `Index.search` (which also
            builds a pandas table per query) is timed on the single queries too, once per repeat.
- recall@10: |top-10 of the type ∩ exact top-10| / 10, averaged over the queries.

Goal (issue 13): recall@10 >= 0.95 at >= 20x the exact index's QPS. When the size-chosen type misses it (or with
`--sweep`), its search-time knob (nprobe for ivfflat, efSearch for hnsw) is swept on the built index (interleaved
with flat again) and printed as a table.

The machine may be shared: the load average before and after is in the figures. Progress goes to stderr; the last
line printed to stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DIM, K = 256, 10
GOAL_RECALL, GOAL_SPEEDUP = 0.95, 20.0
# The search-time knob of each approximate type, swept on the built index.
SWEEP = {"hnsw": ("ef_search", (32, 64, 96, 128, 192)), "ivfflat": ("nprobe", (4, 8, 16, 32, 64))}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float, chunk: int = 100_000):
    """`n` unit vectors: a random centre each plus isotropic Gaussian noise of expected norm `noise`."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    scale = np.float32(noise / np.sqrt(centres.shape[1]))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x = centres[rng.integers(0, len(centres), hi - lo)]
        x += scale * rng.standard_normal((hi - lo, centres.shape[1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = x
    return out


def index_bytes(faiss_index) -> int:
    import faiss

    fd, path = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(faiss_index, path)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def batched_qps(faiss_index, q: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    _, rows = faiss_index.search(q, K)
    return len(q) / (time.perf_counter() - start), rows


def one_thread(fn):
    """Run `fn` with faiss on one OpenMP thread: a lone query uses one core anyway, and on a loaded machine a
    2-thread parallel region per call waits for the second thread to be scheduled (milliseconds per query)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(threads)


def single_qps(faiss_index, q: np.ndarray) -> float:
    def run():
        start = time.perf_counter()
        for i in range(len(q)):
            faiss_index.search(q[i : i + 1], K)
        return len(q) / (time.perf_counter() - start)

    return one_thread(run)


def api_qps(index, q: np.ndarray) -> float:
    def run():
        start = time.perf_counter()
        for i in range(len(q)):
            index.search(q[i], k=K)
        return len(q) / (time.perf_counter() - start)

    return one_thread(run)


def recall_at_k(rows: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, exact)]))


def med(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def measure(variants: dict, q: np.ndarray, qs: np.ndarray, repeats: int, exact: np.ndarray, api: dict) -> dict:
    """Each variant `name -> (faiss index, setup callable)` timed batched then single, all interleaved, `repeats`
    times. Returns per variant the medians, the recall@10 of its batched answers and (if in `api`) Index.search's."""
    runs = {name: {"batched": [], "single": [], "api": []} for name in variants}
    recall = {}
    for r in range(repeats):
        for name, (fi, setup) in variants.items():
            setup()
            qps, rows = batched_qps(fi, q)
            runs[name]["batched"].append(qps)
            if r == 0:
                recall[name] = recall_at_k(rows, exact)
        for name, (fi, setup) in variants.items():
            setup()
            runs[name]["single"].append(single_qps(fi, qs))
            if name in api:
                runs[name]["api"].append(api_qps(api[name], qs))
        log(
            f"  repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {runs[n]['batched'][-1]:.0f} / {runs[n]['single'][-1]:.0f} q/s" for n in variants)
            + "  (batched / single)"
        )
    out = {}
    for name in variants:
        out[name] = {
            "recall_at_10": round(recall[name], 4),
            "batched_qps": med(runs[name]["batched"]),
            "single_qps": med(runs[name]["single"]),
        }
        if runs[name]["api"]:
            out[name]["api_single_qps"] = med(runs[name]["api"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--quick", action="store_true", help="100,000 vectors")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the (unit) centre")
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries (batched mode and recall)")
    ap.add_argument("--single", type=int, default=200, help="queries searched one at a time (single mode)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--also", nargs="*", default=[], choices=["ivfflat", "hnsw", "ivfpq"], help="more index types")
    ap.add_argument(
        "--sweep", action="store_true", help="sweep the chosen type's search knob even when the goal is met"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = 100_000 if args.quick else args.n

    import faiss
    import pandas as pd

    from prodfuse.retrieval import index as rindex

    load_before = os.getloadavg()
    log(
        f"{n:,} vectors of {DIM}-d, {args.clusters} clusters, noise {args.noise}; faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads; load average {load_before[0]:.1f} on {os.cpu_count()} cores"
    )
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    start = time.perf_counter()
    x = clustered(rng, centres, n, args.noise)
    q = clustered(rng, centres, args.queries, args.noise)
    qs = q[: args.single]
    log(f"data: {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    items = pd.DataFrame({"id": [f"i{i}" for i in range(n)]})
    items_seconds = time.perf_counter() - start
    log(f"items table ({n:,} string ids): {items_seconds:.1f}s")

    chosen = rindex.choose_index_type(n)
    kinds = ["flat"] + [k for k in [chosen, *args.also] if k != "flat"]
    kinds = list(dict.fromkeys(kinds))
    built, figures = {}, {}
    for kind in kinds:
        log(f"building {kind} ...")
        start = time.perf_counter()
        idx = rindex.Index.build(x, items, {"space": "synthetic"}, index_type=kind)
        wall = time.perf_counter() - start
        nbytes = index_bytes(idx.faiss_index)
        built[kind] = idx
        figures[kind] = {
            "params": idx.manifest["params"],
            "build_seconds_faiss": idx.manifest["build_seconds"],
            "build_seconds_index_build": round(wall, 2),
            "bytes_per_vector": round(nbytes / n, 1),
        }
        log(
            f"  {kind}: {idx.manifest['build_seconds']:.1f}s faiss, {wall:.1f}s Index.build, "
            f"{nbytes / n:.0f} bytes/vector, params {idx.manifest['params']}"
        )

    flat = built["flat"].faiss_index
    _, exact = flat.search(q, K)  # the reference (also warms the flat index's pages)

    def setter(kind):
        params = built[kind].manifest["params"]
        return lambda: rindex._search_params(built[kind].faiss_index, params)

    log(
        f"timing {', '.join(kinds)} interleaved, {args.repeats} repeats "
        f"({args.queries} batched queries, {len(qs)} single)"
    )
    variants = {k: (built[k].faiss_index, setter(k)) for k in kinds}
    api = {k: built[k] for k in kinds if k != "flat"}
    results = measure(variants, q, qs, args.repeats, exact, api)
    for kind in kinds:
        figures[kind].update(results[kind])
        if kind != "flat":
            for mode in ("batched", "single"):
                ratio = results[kind][f"{mode}_qps"]["median"] / results["flat"][f"{mode}_qps"]["median"]
                figures[kind][f"speedup_{mode}"] = round(ratio, 1)
            f = figures[kind]
            f["meets_goal"] = bool(
                f["recall_at_10"] >= GOAL_RECALL and min(f["speedup_batched"], f["speedup_single"]) >= GOAL_SPEEDUP
            )

    print(
        "| type | build s (faiss / Index.build) | bytes/vector | recall@10 | batched q/s | single q/s | "
        "speed-up batched | speed-up single |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        f = figures[kind]
        print(
            f"| {kind} | {f['build_seconds_faiss']:.1f} / {f['build_seconds_index_build']:.1f} | "
            f"{f['bytes_per_vector']:.0f} | {f['recall_at_10']:.4f} | {f['batched_qps']['median']:.0f} | "
            f"{f['single_qps']['median']:.0f} | {f.get('speedup_batched', 1.0):.1f}x | "
            f"{f.get('speedup_single', 1.0):.1f}x |",
            flush=True,
        )

    sweep = None
    knob = SWEEP.get(chosen)
    if knob and (args.sweep or not figures[chosen]["meets_goal"]):
        param, values = knob
        log(f"sweeping {chosen} {param} {values}, interleaved with flat")
        fi = built[chosen].faiss_index

        def knob_setter(value):
            return lambda: rindex._search_params(fi, {param: value})

        variants = {"flat": (flat, lambda: None)} | {f"{param}={v}": (fi, knob_setter(v)) for v in values}
        res = measure(variants, q, qs, args.repeats, exact, {})
        rindex._search_params(fi, built[chosen].manifest["params"])
        sweep = {"type": chosen, "param": param, "rows": []}
        for v in values:
            r = res[f"{param}={v}"]
            sweep["rows"].append(
                {
                    param: v,
                    "recall_at_10": r["recall_at_10"],
                    "batched_qps": r["batched_qps"]["median"],
                    "single_qps": r["single_qps"]["median"],
                    "speedup_batched": round(r["batched_qps"]["median"] / res["flat"]["batched_qps"]["median"], 1),
                    "speedup_single": round(r["single_qps"]["median"] / res["flat"]["single_qps"]["median"], 1),
                }
            )
        print(
            f"\n{chosen} {param} sweep (flat: {res['flat']['batched_qps']['median']:.0f} batched, "
            f"{res['flat']['single_qps']['median']:.0f} single q/s)"
        )
        print(f"| {param} | recall@10 | batched q/s | single q/s | speed-up batched | speed-up single |")
        print("|---|---|---|---|---|---|")
        for row in sweep["rows"]:
            print(
                f"| {row[param]} | {row['recall_at_10']:.4f} | {row['batched_qps']:.0f} | {row['single_qps']:.0f} | "
                f"{row['speedup_batched']:.1f}x | {row['speedup_single']:.1f}x |",
                flush=True,
            )

    out = {
        "benchmark": "retrieval",
        "n": n,
        "dim": DIM,
        "clusters": args.clusters,
        "noise": args.noise,
        "queries": args.queries,
        "single_queries": len(qs),
        "repeats": args.repeats,
        "seed": args.seed,
        "chosen_type": chosen,
        "items_table_seconds": round(items_seconds, 2),
        "types": figures,
        "sweep": sweep,
        "goal": {"recall_at_10": f">= {GOAL_RECALL}", "speedup": f">= {GOAL_SPEEDUP}x (batched and single)"},
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average_before": round(load_before[0], 1),
        "load_average_after": round(os.getloadavg()[0], 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
