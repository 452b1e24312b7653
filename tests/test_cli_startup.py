"""What the command line loads before it answers: help and bad input come before torch
(which takes seconds to import), and the defaults help shows are the library's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compress import choices

# Runs the CLI in a fresh interpreter and reports its exit code and the heavy modules it
# imported (no timing: what was imported is the cause of the wait).
PROBE = """
import json, sys
from compress import cli
sys.argv = ["compress", *json.loads(sys.argv[1])]
try:
    cli.main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "lm_eval", "datasets") if m in sys.modules)
print(json.dumps([code, heavy]), file=sys.stderr)
"""


def probe(*args: object) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])],
                          capture_output=True, text=True)
    *rest, last = proc.stderr.strip().splitlines()
    code, heavy = json.loads(last)
    return code, heavy, "\n".join(rest)


@pytest.mark.parametrize("args", [["--help"], ["quantize", "--help"], ["--version"]])
def test_help_and_version_load_no_torch(args):
    code, heavy, _ = probe(*args)
    assert code == 0 and heavy == []


@pytest.mark.parametrize("command", ["quantize", "generate", "eval", "bench", "report"])
def test_an_unsupported_model_fails_before_torch_loads(tmp_path, command):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    extra = ["-p", "hi"] if command == "generate" else []
    code, heavy, err = probe(command, tmp_path, *extra)
    assert code == 2 and heavy == []
    assert err.startswith("error: unsupported architecture 'bert'; supported model types:")


def test_help_defaults_are_the_librarys():
    from compress.evals import DEFAULT_CTX, DEFAULT_MAX_TOKENS, harness

    from compress.calibrate import sensitivity
    from compress.recipe import METHODS

    assert (choices.EVAL_CTX, choices.EVAL_MAX_TOKENS) == (DEFAULT_CTX, DEFAULT_MAX_TOKENS)
    assert choices.local_tasks() == harness.LOCAL_TASKS and harness.LOCAL_TASKS
    assert [o.label for o in sensitivity.DEFAULT_OPTIONS] == list(choices.MIXED_OPTIONS)
    assert METHODS is choices.METHODS


def test_models_load_stays_the_function_whatever_loads_first():
    # `compress.models` loads its torch parts on first use; `load` names both a module and
    # the function the package exports
    code = ("from compress import models\nmodels.build\nimport types\n"
            "assert not isinstance(models.load, types.ModuleType), models.load\n"
            "assert models.load.__name__ == 'load' and models.layers.CausalLM\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
