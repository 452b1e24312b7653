"""lm-eval tasks on our models, offline: the local task definitions in `tasks/` and the
`compress` lm-eval model, run through lm-eval's own Python API.

`compress-lm-eval` is lm-eval's command line with both registered first: lm-eval 0.4
discovers neither third-party models nor task folders by itself, so
`compress-lm-eval --model compress --model_args pretrained=DIR --tasks compress_arc_easy`
is the command-line form of `compress eval DIR --tasks compress_arc_easy`.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from unittest import mock

from compress.progress import libraries_quiet

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("compress_*.yaml")))
# The upstream names of the local tasks, accepted for convenience.
ALIASES = {name.removeprefix("compress_"): name for name in LOCAL_TASKS}


class TaskError(ValueError):
    """A task request that cannot run here (unknown task, missing data)."""


def resolve_tasks(names: list[str]) -> list[str]:
    """Local task names for `names` (upstream names such as arc_easy map to ours)."""
    resolved = []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in LOCAL_TASKS:
            raise TaskError(f"task {name!r} has no local data (no hub access here); "
                            f"available: {', '.join(LOCAL_TASKS)}")
        resolved.append(name)
    return resolved


def check_task_data() -> None:
    """Raise TaskError naming what to install when the tasks' data package is missing."""
    spec = importlib.util.spec_from_file_location("_compress_task_loaders",
                                                  TASKS_DIR / "loaders.py")
    loaders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaders)
    try:
        loaders.data_root()
    except loaders.MissingTaskData as e:
        raise TaskError(str(e)) from None


def local_task_manager():
    """lm-eval's `TaskManager` over the local task folder alone: every task we run is
    local (`resolve_tasks`), and indexing lm-eval's ~15,000 own task files as well costs
    10-20 s per run."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def run_tasks(model_dir: str | Path, tasks: list[str], limit: int | None = None,
              batch_size: int = 8, num_fewshot: int | None = None,
              device: str = "cpu") -> dict[str, dict[str, float]]:
    """Task -> metric -> value (lm-eval's metric names, e.g. "acc", "acc_stderr")."""
    import lm_eval

    from . import lm_eval_model  # registers the "compress" model

    tasks = resolve_tasks(tasks)
    check_task_data()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on pre-built models
    model = lm_eval_model.CompressLM(pretrained=str(model_dir), batch_size=batch_size,
                                     device=device)
    # lm-eval records `git describe` of the working directory, and git prints "fatal: not
    # a git repository" to our users' stderr outside one: that record is not ours to keep.
    with (mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None),
          libraries_quiet()):
        out = lm_eval.simple_evaluate(
            model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
            task_manager=local_task_manager(), log_samples=False,
            bootstrap_iters=1000)
    return {task: {metric.split(",")[0]: float(value) for metric, value in values.items()
                   if metric != "alias" and isinstance(value, int | float)}
            for task, values in out["results"].items()}


def cli() -> None:
    """`compress-lm-eval`: lm-eval's CLI with the compress model and local tasks known."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers the model)

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()
