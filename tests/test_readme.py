"""README.md says what the code does: its model table is `python -m vae_toolkit models`."""

from __future__ import annotations

import re
from pathlib import Path

from vae_toolkit import __main__ as cli
from vae_toolkit import list_available_models

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_model_table() -> list[list[str]]:
    section = README.read_text().split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip().strip("`") for cell in row.strip().strip("|").split("|")] for row in rows]


def test_readme_model_table_is_the_models_command():
    printed = [re.split(r"\s{2,}", line.strip()) for line in cli.format_models().splitlines()]
    assert _readme_model_table() == printed


def test_readme_lists_every_registered_model():
    assert [row[0] for row in _readme_model_table()[1:]] == list_available_models()


CI = README.parent / ".ci" / "run"


def _readme_commands(text: str) -> list[str]:
    """Shell commands of the README's bash blocks (comments dropped, ``a && b`` split), in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_readme_install_and_test_commands_are_the_ones_ci_runs():
    lines = [line.strip() for line in CI.read_text().splitlines()]
    steps = lines[lines.index('. "$venv/bin/activate"') + 1 :]
    ci = [c for c in steps if c and not c.startswith("#") and c != "python -m pip install --upgrade pip"]
    assert "python -m pytest" in ci and 'pip install -e ".[test]"' in ci  # the parse found CI's commands
    text = README.read_text()
    readme = _readme_commands(text)
    missing = [c for c in ci if c not in readme and f"`{c}`" not in text]
    assert missing == []


def test_readme_installs_torch_first_and_says_build_needs_its_package():
    install = README.read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    commands = _readme_commands(install)
    torch_first = [i for i, c in enumerate(commands) if c.startswith("pip install torch")]
    assert torch_first and torch_first[0] < commands.index("pip install .")
    assert commands.index("pip install build") < commands.index("python -m build")
