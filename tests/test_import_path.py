"""A source checkout's kernels/ and evals/ must never be imported as the PyPI packages of
those names (transformers imports `kernels` whenever its distribution is installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from compress import import_path

ROOT = Path(__file__).resolve().parent.parent


def _outside_checkout(spec) -> bool:
    return spec is None or not Path(spec.origin or "").resolve().is_relative_to(ROOT)


def test_pytest_run_from_the_checkout_does_not_see_its_kernels_folder():
    assert import_path.checkout_root() == ROOT
    for name in ("kernels", "evals"):
        assert _outside_checkout(importlib.util.find_spec(name)), name


def test_python_m_from_the_checkout_does_not_see_its_kernels_folder():
    probe = ("import compress, importlib.util as u\n"
             "for name in ('kernels', 'evals'):\n"
             "    spec = u.find_spec(name)\n"
             "    print(spec.origin if spec else None)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    for origin in out.split():
        assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT), origin


def test_only_the_checkout_root_is_dropped(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    other = str(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(ROOT), other, str(ROOT / "tests")])
    import_path.drop_checkout_root()
    assert sys.path == [other, str(ROOT / "tests")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(ROOT)])
    import_path.drop_checkout_root()
    assert sys.path == [""]


def test_no_script_folder_holds_a_module_of_those_names():
    # a script's own folder is first on its sys.path
    for folder in ("benchmarks", "tests", ".ci"):
        for name in ("kernels", "evals"):
            found = [p for p in (ROOT / folder).rglob(f"{name}.py")]
            assert not found, found
