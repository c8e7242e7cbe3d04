"""The package's shape: imports go down the pipeline only, nothing outside the CLI imports it, no cycles; old run
folders still load and predict the same probabilities; the public API is importable without TensorFlow."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "prodfuse"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"
# Lowest first: a module may import its own layer and the layers below it, never above.
LAYERS = [
    "version",
    "checks",
    "progress",
    "allocator",
    "data",
    "encoders",
    "extraction",
    "modeling",
    "inference",
    "retrieval",
    "evaluation",
    "serving",
    "cli",
]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "prodfuse" else None


def _imports() -> dict[str, set[str]]:
    """module -> the prodfuse modules it imports anywhere in its body (lazy imports in functions included)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("prodfuse")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prodfuse"):
                base = node.module
                found |= {
                    f"{base}.{a.name}" if f"{base}.{a.name}".replace(".", "/") in _MODULE_PATHS else base
                    for a in node.names
                }
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import; use absolute prodfuse.* imports")
        out[name] = found
    return out


_MODULE_PATHS = {str(p.relative_to(ROOT.parent).with_suffix("")).replace("/__init__", "") for p in ROOT.rglob("*.py")}


def test_imports_only_go_down_the_pipeline():
    bad = []
    for module, imported in _imports().items():
        src = _layer(module)
        if src is None:  # prodfuse/__init__: the lazy public API on top of everything
            continue
        for target in imported:
            dst = _layer(target)
            if dst is None:
                bad.append(f"{module} imports the package root {target}")
            elif LAYERS.index(dst) > LAYERS.index(src):
                bad.append(f"{module} ({src}) imports {target} ({dst}), a later stage")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    imports = _imports()
    graph = {m: {t for t in imp if t in imports} for m, imp in imports.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_library_module_uses_argparse_or_print():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if "cli" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    offenders.append(f"{path.name}: imports argparse")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: print()")
    assert not offenders, offenders


def test_import_prodfuse_and_help_do_not_load_tensorflow():
    code = (
        "import sys, prodfuse, prodfuse.cli; prodfuse.cli.build_parser(); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_names_resolve():
    import prodfuse

    for name in prodfuse.__all__:
        assert getattr(prodfuse, name) is not None, name


def test_run_folder_from_prodfuse_0_1_loads_and_predicts_the_same(tmp_path):
    """tests/fixtures/run_v0_1: a run folder and shards written by the code before the config objects (its
    config.json keeps the CLI flags under "args"); it must load and give the probabilities it gave then."""
    import prodfuse
    from prodfuse.data.sequence import read_items
    from prodfuse.inference.forward import forward

    run = prodfuse.Run.load(FIXTURE / "run")
    assert run.calibrated and run.temperature == pytest.approx(0.7612966293698542)
    assert run.train_config.seed == 1 and run.train_config.fusion == "gated" and run.train_config.epochs == 3
    arrays = read_items(FIXTURE / "shards", run.inputs)
    probs = forward(run.model, arrays, run.temperature)["probs"]
    np.testing.assert_allclose(probs, np.load(FIXTURE / "expected_probs.npy"), atol=1e-6)
    # and through the Predictor and the command
    table = prodfuse.Predictor.from_run(FIXTURE / "run").predict_shards(FIXTURE / "shards", top_k=4)
    order = np.argsort(-probs, axis=1, kind="stable")
    np.testing.assert_allclose(
        table[[f"prob_{i}" for i in range(1, 5)]].to_numpy(), np.take_along_axis(probs, order, 1), atol=1e-5
    )
    assert json.loads((FIXTURE / "run" / "config.json").read_text())["args"]["fusion"] == "gated"
