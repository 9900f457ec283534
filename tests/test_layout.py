"""The package's layout: modules one can read in one sitting, imports in one direction, old import paths kept."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vae_toolkit"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))
MAX_LINES = 800


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports, at the top or inside functions (a lazy import is still an edge)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import a, b: modules where they are modules, else the package itself
                found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vae_toolkit"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - {module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_the_package_modules():
    """``__init__`` re-exports the public names, so edges into it (``from . import __version__``) are left out
    only for modules that ``__init__`` does not reach; any cycle, lazy imports included, fails."""
    graph = {m: _imports(m) for m in MODULES}
    assert _cycle(graph) is None


@pytest.mark.parametrize("module", MODULES)
def test_each_module_reads_in_one_sitting(module):
    text = (PACKAGE / f"{module}.py").read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert ast.get_docstring(ast.parse(text)), "each module opens with a docstring that says what it holds"


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_another_modules_private_names(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    private = [
        f"{node.module}.{a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for a in node.names
        if a.name.startswith("_") and a.name != "__version__"
    ]
    assert private == []


# The public names of 0.2.0's modules before they were split: each stays importable from where it was.
OLD_PATHS = {
    "vae_toolkit.dataset": [
        "BucketBatchSampler", "EncodeSummary", "LatentStore", "StoreDamagedError", "StoreLockedError",
        "StoreMismatchError", "check_store", "default_workers", "encode_dataset", "failure_reason", "find_images",
        "iter_batches", "iter_images", "sample_generator", "INDEX_NAME",
    ],
    "vae_toolkit.evaluate": [
        "DEFINITIONS", "METRICS", "EvaluationResult", "ReportExistsError", "compare", "evaluate", "lpips_status",
        "mae", "ms_ssim", "psnr", "reconstruct", "ssim", "check_report_folder",
    ],
    "vae_toolkit.image_utils": [
        "ImageProcessingError", "load_and_preprocess_image", "load_images", "load_for_encoding", "available_cpus",
        "open_image", "image_extensions", "center_crop_to_multiple", "tensor_to_pil", "pil_to_tensor",
        "ImageProcessor", "DEFAULT_PROCESSOR", "SD_PROCESSOR",
    ],
    "vae_toolkit": ["VAEToolkitWarning", "__version__"],
    "vae_toolkit.__main__": ["main", "build_parser", "collect_env", "format_env", "format_models"],
}  # fmt: skip


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in OLD_PATHS.items() for n in names])
def test_every_public_name_is_importable_where_it_was(module, name):
    assert getattr(importlib.import_module(module), name) is not None


def test_image_processing_error_keeps_its_0_1_0_home():
    from vae_toolkit.image_utils import ImageProcessingError

    assert ImageProcessingError.__module__ == "vae_toolkit.image_utils"


def test_the_version_is_read_from_one_place():
    import vae_toolkit
    from vae_toolkit._version import __version__

    assert vae_toolkit.__version__ == __version__
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'version = { attr = "vae_toolkit._version.__version__" }' in text and '\nversion = "' not in text
