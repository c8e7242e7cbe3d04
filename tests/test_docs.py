"""The documentation cannot drift from the code: every command has a page listing every flag of its parser, every
`prodfuse` command line in the README and the docs uses only flags that exist, the README's links resolve, and the
version is the same in pyproject.toml, `prodfuse --version`, `prodfuse.__version__`, the changelog, shard manifests,
run folders and index manifests."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from prodfuse.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("prodfuse_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def _flags(parser) -> set[str]:
    return {s for _, actions in hooks.documented_actions(parser) for a in actions for s in a.option_strings}


def test_every_command_has_a_page_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert set(hooks.command_parsers()) == set(COMMANDS)
    for name in COMMANDS:
        page = DOCS / "commands" / f"{name}.md"
        assert page.is_file(), f"no page for `prodfuse {name}`: write {page.relative_to(ROOT)}"
        assert f"commands/{name}.md" in nav, f"{page.relative_to(ROOT)} is not in mkdocs.yml's nav"
        assert f"<!-- flags: {name} -->" in page.read_text(), f"{page.name} has no flag table marker"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_of_a_command_is_on_its_page(name):
    parser = hooks.command_parsers()[name]
    built = hooks.render((DOCS / "commands" / f"{name}.md").read_text())
    missing = sorted(f for f in _flags(parser) if not re.search(rf"`{re.escape(f)}[ `,]", built))
    assert not missing, f"flags of `prodfuse {name}` missing from its page: {missing}"
    assert "<!-- flags:" not in built


def _command_lines(text: str):
    """Every `prodfuse CMD ...` (and the two top-level scripts') command line in fenced or inline code, with
    backslash continuations joined."""
    text = text.replace("\\\n", " ")
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    scripts = {"extract_embeddings.py": "extract", "train_multimodal_mlp.py": "train"}
    for span in spans:
        for line in span.splitlines():
            for part in re.split(r"&&|;|\|", line.split("#")[0]):
                m = re.search(r"(?:^|\s)prodfuse\s+([a-z]+)\b(.*)", part)
                if m and m.group(1) in COMMANDS:
                    yield m.group(1), m.group(2)
                for script, command in scripts.items():
                    if f"python {script}" in part:
                        yield command, part.split(script, 1)[1]


def test_documented_command_lines_use_only_existing_flags():
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    parsers = hooks.command_parsers()
    seen, bad = set(), []
    for page in pages:
        for command, rest in _command_lines(page.read_text()):
            seen.add(command)
            known = _flags(parsers[command])
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                if flag not in known:
                    bad.append(f"{page.relative_to(ROOT)}: prodfuse {command} {flag}")
    assert not bad, "documented flags that the parsers do not have:\n" + "\n".join(bad)
    assert seen == set(COMMANDS), f"commands with no example command line: {set(COMMANDS) - seen}"


def test_readme_links_resolve_and_results_table_is_marked():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    marker = "<!-- results: filled by benchmarks/model_quality.py -->"
    assert readme.count(marker) == 1
    assert readme.split(marker, 1)[1].lstrip("\n").startswith("| data set")


def _pyproject_version() -> str:
    return re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def test_version_is_the_same_everywhere(capsys):
    import prodfuse

    version = _pyproject_version()
    assert prodfuse.__version__ == version, "reinstall: python -m pip install --no-deps -e ."
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"prodfuse {version}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"(?m)^## \[(Unreleased\] - {re.escape(version)}|{re.escape(version)}\])", changelog)


def test_shard_manifest_run_config_and_index_record_the_version(tmp_path):
    import prodfuse
    from prodfuse.extraction.extract import _versions
    from prodfuse.retrieval.config import IndexConfig
    from prodfuse.retrieval.search import build_index
    from synthetic import write_synthetic_shards

    assert _versions()["prodfuse"] == prodfuse.__version__  # what extraction writes into manifest.json "versions"

    rng = np.random.default_rng(0)
    labels = np.array(["a", "b"] * 30)
    image = (rng.normal(size=(60, 8)) + (labels == "a")[:, None] * 3).astype(np.float32)
    text = rng.normal(size=(60, 4)).astype(np.float32)
    shards = write_synthetic_shards(tmp_path / "emb", image, text, labels)
    run = prodfuse.train(
        prodfuse.TrainConfig(embeddings=str(shards), out=str(tmp_path / "run"), fusion="concat", epochs=1, verbose=0)
    )
    config = json.loads((run.path / "config.json").read_text())
    assert config["versions"]["prodfuse"] == prodfuse.__version__

    build_index(IndexConfig(embeddings=str(shards), out=str(tmp_path / "idx"), space="image"))
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["versions"]["prodfuse"] == prodfuse.__version__
