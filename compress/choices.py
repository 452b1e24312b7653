"""What a user chooses among, and the defaults they get: free of torch, so that the
command line can show them in help and check input before loading anything heavy
(`compress --help` in a fraction of a second instead of several).

The evaluation defaults are copies of `compress.evals`' (whose package imports torch);
tests/test_cli.py holds them equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# awq: AWQ scaling and clipping, then RTN; awq+gptq: AWQ scaling, then GPTQ rounding;
# signround: rounding offsets and ranges learned per layer by signed gradient descent.
METHODS = ("rtn", "gptq", "awq", "awq+gptq", "signround")
# The settings `quantize --target-bits` may give each Linear (sensitivity.Option labels).
MIXED_OPTIONS = ("w3g128", "w3g64", "w3g32", "w4g128", "w4g64", "w4g32", "w8")
EVAL_CTX = 512  # compress.evals.DEFAULT_CTX
EVAL_MAX_TOKENS = 16384  # compress.evals.DEFAULT_MAX_TOKENS


def local_tasks() -> tuple[str, ...]:
    """The lm-eval tasks run offline on local data (compress.evals.harness.LOCAL_TASKS),
    read from the task files without importing the package."""
    spec = importlib.util.find_spec("compress.evals")
    if spec is None or not spec.submodule_search_locations:
        return ()
    tasks = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    return tuple(sorted(p.stem for p in tasks.glob("compress_*.yaml")))
