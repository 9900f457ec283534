"""README.md says what the code does: its model table is `python -m vae_toolkit models`."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from vae_toolkit import __main__ as cli
from vae_toolkit import list_available_models

README = Path(__file__).resolve().parents[1] / "README.md"
API = README.parent / "docs" / "api.md"  # README's API reference, kept beside it


def _readme_model_table() -> list[list[str]]:
    section = README.read_text().split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
    first = re.search(r"(?:^\|.*\n)+", section, re.M)  # the section's first table (the latent conventions follow)
    assert first, "README's Models section has no table"
    rows = [line for line in first.group(0).splitlines() if line.startswith("|") and not line.startswith("|---")]
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


def _section(text: str, heading: str) -> str:
    """The body of README's ``## heading`` section, up to the next ``## `` heading."""
    parts = text.split(f"\n## {heading}\n", 1)
    assert len(parts) == 2, f"README has no '## {heading}' section"
    return parts[1].split("\n## ", 1)[0]


def _table_first_cells(body: str) -> list[str]:
    """The first cell of every row of the markdown tables in ``body`` (header and separator rows dropped)."""
    cells = []
    for table in re.findall(r"(?:^\|.*\|[ \t]*\n?)+", body, re.M):
        rows = table.strip().splitlines()
        if len(rows) < 2 or not re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", rows[1].strip()):
            continue  # not a table: no separator row under its header
        cells += [re.split(r"(?<!\\)\|", row.strip())[1].strip() for row in rows[2:]]
    return cells


def _readme_api() -> dict[str, list[str]]:
    """``module -> names`` of the API reference (docs/api.md, which README links to): each ``### Title
    (`module`)`` heading and the names that open the first cell of the rows of its tables (``Class.method`` kept
    dotted; signatures dropped)."""
    api = API.read_text(encoding="utf-8").split("\n", 1)[1].split("\n## ", 1)[0]  # below the title, up to Errors
    found: dict[str, list[str]] = {}
    for block in re.split(r"^(?=### )", api, flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        module = re.fullmatch(r"### [^(`]+\(`(vae_toolkit(?:\.\w+)*)`\)\s*", heading)
        assert module, f"API reference heading without a `(module)`: {heading!r}"
        names = []
        for cell in _table_first_cells(body):
            for span in re.findall(r"`([^`]+)`", cell):
                name = re.match(r"[A-Za-z_][\w.]*", span)
                assert name, f"API reference cell {cell!r}: {span!r} does not start with a name"
                names.append(name.group(0))
        assert names, f"API reference section {heading!r} lists no names"
        found[module.group(1)] = names
    return found


def test_readme_api_reference_parse_finds_every_section():
    api = _readme_api()
    # the parse must find the sections (a renamed heading or a changed table layout fails here, not silently)
    assert {"vae_toolkit.image_utils", "vae_toolkit.vae_loader", "vae_toolkit.dataset"} <= set(api)
    assert sum(len(names) for names in api.values()) >= 50
    assert "load_and_preprocess_image" in api["vae_toolkit.image_utils"]
    assert "VAELoader.load_sd_vae" in api["vae_toolkit.vae_loader"]


def test_every_name_of_the_readme_api_reference_imports_from_the_module_it_names():
    api = _readme_api()
    assert len(api) >= 5, api  # a parse that finds nothing imports nothing: fail instead
    missing = []
    for module_name, names in api.items():
        module = importlib.import_module(module_name)
        for name in names:
            obj: object = module
            for part in name.split("."):
                if not hasattr(obj, part):
                    missing.append(f"{module_name}: {name}")
                    break
                obj = getattr(obj, part)
    assert missing == []


def _extra_names(requirement: str) -> list[str]:
    """What README must name for one requirement of an extra: the distribution, or the extras of a
    self-reference (``vae-toolkit[test,nvml]``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, requirement
    name, extras = match.groups()
    if name.lower().replace("_", "-") == "vae-toolkit":
        return [e.strip() for e in (extras or "").split(",") if e.strip()]
    return [name]


def test_readme_install_names_every_extra_and_what_it_installs():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib
    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras, "pyproject.toml declares no extras"  # the parse found them
    install = _section(README.read_text(encoding="utf-8"), "Install")
    rows = {}
    for line in install.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if cells:
            rows[cells[0].strip("`")] = " ".join(cells[1:]).lower().replace("_", "-")
    missing = [
        f"{extra}: {name}"
        for extra, requirements in extras.items()
        for name in ([extra] if extra not in rows else [n for r in requirements for n in _extra_names(r)])
        if extra not in rows or name.lower().replace("_", "-") not in rows[extra]
    ]
    assert missing == []


def test_readme_stays_short_and_links_the_api_reference():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 460, "README grows past ~450 lines: move reference material to docs/"
    assert "(docs/api.md)" in _section(text, "API reference")
