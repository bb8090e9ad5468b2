"""`lmslice eval`: lm-eval runs a local multiple-choice task on a sliced model, and its numbers agree
with log-likelihoods computed here directly from the model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.evaluation.zeroshot import check_task_names, task_manager, zero_shot
from lmslice.slicing import slice_model

TASK = "lmslice_tiny_choice"
ITEMS = [
    ("The keyword that defines a function is", ["def", "class", "import"], 0),
    ("A list is written between", ["square brackets", "quotes", "parentheses"], 0),
    ("To leave a loop early, use", ["continue", "break"], 1),
    ("The value of an empty expression is", ["zero", "None", "False", "an error"], 1),
    ("Exceptions are caught with", ["for", "while", "except"], 2),
    ("A dictionary maps keys to", ["values", "functions"], 0),
]


def write_choice_task(directory: Path, name: str = TASK) -> Path:
    """An lm-eval multiple-choice task reading a local JSON-lines file: works offline."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": question, "choices": choices, "label": label}) + "\n"
                            for question, choices, label in ITEMS))
    (directory / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_choice_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    return lmslice.save_sliced(model, tiny_tokenizer, tmp_path_factory.mktemp("eval") / "sliced")


def continuation_loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenising the joined text and scoring the tokens past the context."""
    context_ids = tokenizer(context).input_ids
    ids = tokenizer(context + continuation).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logprobs[position - 1, ids[position]].item() for position in range(len(context_ids), len(ids)))


def test_cli_prints_accuracies_in_range(sliced_dir: Path, task_dir: Path, capsys) -> None:
    code = main(["eval", str(sliced_dir), "--tasks", TASK, "--include-path", str(task_dir), "--limit", "4",
                 "--batch-size", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    score = result["tasks"][TASK]
    assert score["items"] == 4
    assert 0 <= score["acc"] <= 1 and 0 <= score["acc_norm"] <= 1
    assert result["average"] == score["acc_norm"]  # acc_norm is defined, so it is what is averaged


def test_lm_eval_agrees_with_direct_loglikelihoods(sliced_dir: Path, task_dir: Path) -> None:
    model, tokenizer = lmslice.load_with_tokenizer(sliced_dir)
    result = zero_shot(model, tokenizer, [TASK], include_path=task_dir, batch_size=4, log_samples=True)
    samples = result.samples[TASK]
    assert len(samples) == len(ITEMS)
    correct, correct_norm = [], []
    for sample in samples:
        question, choices, label = ITEMS[sample["doc_id"]]
        ours = [continuation_loglikelihood(model, tokenizer, context, continuation)
                for context, continuation in sample["arguments"]]
        theirs = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        best = max(range(len(choices)), key=lambda index: ours[index])
        best_norm = max(range(len(choices)), key=lambda index: ours[index] / len(choices[index]))
        assert sample["acc"] == float(best == label)
        correct.append(best == label)
        correct_norm.append(best_norm == label)
    score = result.tasks[0]
    assert score.acc == pytest.approx(sum(correct) / len(ITEMS))
    assert score.acc_norm == pytest.approx(sum(correct_norm) / len(ITEMS))
    assert math.isclose(result.average, score.acc_norm)


def test_unknown_task_is_a_one_line_error(task_dir: Path) -> None:
    manager = task_manager([TASK], task_dir)  # local tasks only: indexing lm-eval's own takes ~20 s
    with pytest.raises(LmsliceError, match="unknown task 'lmslice_tiny_chioce'; did you mean lmslice_tiny_choice"):
        check_task_names(manager, [TASK, "lmslice_tiny_chioce"])


def test_missing_lm_eval_names_the_extra(sliced_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    model, tokenizer = lmslice.load_with_tokenizer(sliced_dir)
    with pytest.raises(LmsliceError, match=r"lmslice\[eval\]"):
        zero_shot(model, tokenizer, [TASK])
