"""Packaging and layering rules from DESIGN.md that would otherwise rot silently."""

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_top_level_kernels_or_evals_package_is_shipped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kernels" not in project["packages"] and "evals" not in project["packages"]
    assert project["package-dir"] == {"compress.kernels": "kernels", "compress.evals": "evals"}


def test_transformers_does_not_mistake_our_kernels_for_the_hub_package():
    # transformers 5.2x requires the hub's `kernels` and imports it here; run from the
    # checkout, its kernels/ must not stand in for it (compress/import_path.py)
    import transformers.integrations.hub_kernels as hub_kernels

    assert not hub_kernels.is_kernels_available() or hasattr(hub_kernels, "CUDAProperties")


def test_kernels_import_only_torch_and_triton():
    # ... and the standard library (the native kernel's build needs hashlib, shutil, ...)
    for path in (ROOT / "kernels").glob("*.py"):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top in {"torch", "triton"} or top in sys.stdlib_module_names, (path, name)


def test_quant_algorithms_do_no_io():
    for path in (ROOT / "compress" / "quant").glob("*.py"):
        for name in imports_of(path):
            assert name.split(".")[0] not in {"safetensors", "json", "os", "pathlib",
                                              "transformers", "yaml"}, (path, name)


def test_only_formats_names_packed_tensors():
    for path in ROOT.glob("compress/**/*.py"):
        if "formats" in path.parts:
            continue
        assert "weight_packed" not in path.read_text(), path
