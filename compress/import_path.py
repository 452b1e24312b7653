"""Keep a source checkout's root off the import path.

The checkout's root holds `kernels/` and `evals/`, which install as `compress.kernels` and
`compress.evals`. Both names are also PyPI packages, and transformers imports the PyPI
`kernels` whenever its distribution is installed (transformers 5.2x requires it). Python puts
the working directory first on sys.path for `python -m ...` and `python -c ...`, so run from
the checkout (as `python -m pytest` is) the root's `kernels/` would be imported in its place,
and importing transformers failed with "cannot import name 'CUDAProperties' from 'kernels'".
compress itself never needs the root on the path: an install, editable or not, maps its
packages by name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_SHADOWING = ("kernels", "evals")


def checkout_root() -> Path | None:
    """The source checkout this compress was imported from, or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and all(
            (root / name / "__init__.py").is_file() for name in _SHADOWING):
        return root
    return None


def drop_checkout_root() -> None:
    """Remove the checkout's root (and "", the working directory, when that is the root)
    from sys.path, unless one of the shadowed names was already imported from it."""
    root = checkout_root()
    if root is None:
        return
    for name in _SHADOWING:
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", "") or "").resolve(
                ).is_relative_to(root):
            return
    sys.path[:] = [entry for entry in sys.path
                   if Path(os.path.realpath(entry or os.curdir)) != root]
