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
