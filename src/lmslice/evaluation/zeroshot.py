"""Zero-shot accuracy through lm-evaluation-harness, run on a model object already in memory.

lm-eval does the tasks (prompts, choices, log-likelihoods, metrics); this module only hands it the
loaded (dense or sliced) model, finds the tasks, and reduces its results to acc / acc_norm per task and
the paper's average.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmslice.errors import LmsliceError

PAPER_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")


@dataclass
class TaskScore:
    task: str
    acc: float | None
    acc_norm: float | None
    items: int

    @property
    def score(self) -> float:
        """acc_norm where the task defines it, else acc: what the paper averages."""
        return self.acc_norm if self.acc_norm is not None else self.acc


@dataclass
class ZeroShot:
    tasks: list[TaskScore]
    average: float
    # lm-eval's per-item records (its `samples` output), kept only when asked for
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": {score.task: {**asdict(score), "score": score.score} for score in self.tasks},
                "average": self.average}


def zero_shot(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
              limit: int | None = None, batch_size: int = 8,
              include_path: str | os.PathLike[str] | None = None, manager: Any = None,
              log_samples: bool = False) -> ZeroShot:
    """Runs lm-eval's `tasks` (names it knows, or defined by YAML files under `include_path`) on
    `model` with no few-shot examples; `limit` evaluates only the first N items of each task.
    `manager` (from `task_manager`) saves indexing the tasks again."""
    lm_eval, hflm_class, _ = _lm_eval()
    manager = manager if manager is not None else task_manager(tasks, include_path)
    built = [item for name in tasks for item in load_task(manager, name)]
    leaves = [task.task_name for item in built
              for task in (item.get_all_tasks() if hasattr(item, "get_all_tasks") else [item])]
    # lm-eval warns that a model object bypasses its loading options; passing one is the point here
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        lm = hflm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)
    # bootstrap_iters=0: no stderr resampling, which costs more than the evaluation on small runs
    results = lm_eval.simple_evaluate(lm, tasks=built, task_manager=manager, limit=limit, bootstrap_iters=0,
                                      log_samples=log_samples)
    scores = [_task_score(name, results["results"][name]) for name in leaves]
    average = sum(score.score for score in scores) / len(scores)
    samples = results.get("samples", {}) if log_samples else {}
    return ZeroShot(scores, average, samples)


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike[str] | None = None) -> Any:
    """lm-eval's task index, including the YAML tasks under `include_path`, once it is checked that
    it knows every one of `tasks` (call it before loading a model to fail early)."""
    _, _, manager_class = _lm_eval()
    if not tasks:
        raise LmsliceError("no tasks given")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise LmsliceError(f"--include-path {include_path} is not a directory")
        local = manager_class(include_path=str(include_path), include_defaults=False)
        # Indexing lm-eval's own thousands of task files takes ~20 s; skip it when every task is local.
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = manager_class(include_path=str(include_path) if include_path is not None else None)
    check_task_names(manager, tasks)
    return manager


def check_task_names(manager: Any, tasks: Sequence[str]) -> None:
    for name in tasks:
        if name not in manager.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise LmsliceError(f"unknown task {name!r}; {hint}(define your own in a YAML file under "
                               "--include-path DIR)")


def _lm_eval() -> tuple[Any, type, type]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise LmsliceError("zero-shot evaluation needs lm-eval: pip install 'lmslice[eval]'") from error
    return lm_eval, HFLM, TaskManager


def load_task(manager: Any, name: str) -> list[Any]:
    """The task, group or tag's tasks, with their data (downloaded from the hub unless local)."""
    try:
        loaded = manager.load(name)
    except Exception as error:  # noqa: BLE001 - dataset and hub errors come in many types
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise LmsliceError(f"cannot load task {name!r} ({type(error).__name__}: {message}); without network "
                           "access give a local task with --include-path") from error
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def _task_score(name: str, metrics: dict[str, Any]) -> TaskScore:
    def metric(key: str) -> float | None:
        # lm-eval names metrics "<metric>,<filter>"; multiple-choice tasks use the "none" filter
        values = [value for full, value in metrics.items() if full.split(",")[0] == key]
        return float(values[0]) if values else None

    acc, acc_norm = metric("acc"), metric("acc_norm")
    if acc is None and acc_norm is None:
        raise LmsliceError(f"task {name!r} reports neither acc nor acc_norm; use multiple-choice tasks")
    return TaskScore(name, acc, acc_norm, int(metrics.get("sample_len", 0)))


def format_table(result: ZeroShot) -> str:
    def cell(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    width = max(len("average"), *(len(score.task) for score in result.tasks))
    lines = [f"{'task':<{width}}  {'acc':>8}  {'acc_norm':>8}  {'items':>6}"]
    lines += [f"{score.task:<{width}}  {cell(score.acc):>8}  {cell(score.acc_norm):>8}  {score.items:>6}"
              for score in result.tasks]
    lines.append(f"{'average':<{width}}  {result.average:>8.4f}  (acc_norm where defined, else acc)")
    return "\n".join(lines)
