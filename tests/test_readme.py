"""The README's two fresh-machine commands: CI must run exactly the test command the README shows."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    demo, tests = readme_commands()[:2]
    assert "pytest" in tests and "requirements.txt" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci  # verbatim, as a line of its own


def test_readme_demo_command_installs_and_runs_both_steps():
    demo = readme_commands()[0]
    assert demo.index("requirements.txt") < demo.index("extract_embeddings.py") < demo.index("train_multimodal_mlp.py")
    assert "--catalog" not in demo  # the built-in demo, no data needed
