"""Distillation from the dense model: the loss is 0 exactly when the student matches the teacher, training
lowers the KL on held-out text (LoRA and every parameter), and the CLI saves a model that reloads with
the logits it was saved with; a teacher with another vocabulary is refused before any work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.distill import Distillation, distillation_loss
from lmslice.errors import LmsliceError
from lmslice.finetune import TrainingConfig, finetune
from lmslice.slicing import slice_model


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    model = tiny_models.build("llama", torch.float32)  # the weights of conftest's dense_dir
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    return lmslice.save_sliced(model, tiny_tokenizer, tmp_path_factory.mktemp("distill") / "sliced")


def held_out_kl(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    with torch.no_grad():
        losses = [Distillation(teacher).loss(student, batch["input_ids"], batch["attention_mask"])
                  for batch in tiny_models.random_batches(count=2, seed=11)]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("top_k", [None, 5])
def test_the_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(top_k: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 7, 50, generator=generator, dtype=torch.float64) * 3
    mask = torch.ones(2, 7, dtype=torch.long)
    assert distillation_loss(teacher.clone(), teacher, mask, 2.0, top_k).item() == pytest.approx(0, abs=1e-6)
    other = teacher + torch.randn(2, 7, 50, generator=generator, dtype=torch.float64)
    assert distillation_loss(other, teacher, mask, 2.0, top_k).item() > 1e-3
    # a masked-out position does not count: changing the student there changes nothing
    mask[1, 3] = 0
    moved = teacher.clone()
    moved[1, 3] += 5 * torch.randn(50, generator=generator, dtype=torch.float64)
    assert distillation_loss(moved, teacher, mask, 2.0, top_k).item() == pytest.approx(0, abs=1e-6)


def test_a_student_equal_to_its_teacher_has_zero_loss(dense_dir: Path) -> None:
    teacher = lmslice.load(dense_dir)
    assert held_out_kl(copy.deepcopy(teacher), teacher) == pytest.approx(0, abs=1e-6)


def damaged_student() -> torch.nn.Module:
    """The tiny Llama sliced at sparsity 0 (rotated, nothing removed), then harmed by a rank-1 change of
    every MLP output projection: a student that training can bring back to its teacher (a random tiny
    teacher's function of random tokens is out of reach of a truly smaller one)."""
    student = tiny_models.build("llama", torch.float32)
    slice_model(student, tiny_models.random_batches(), 0.0, progress=False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in student.model.layers:
            weight = layer.mlp.down_proj.weight
            weight += 0.3 * torch.outer(torch.randn(weight.shape[0], generator=generator),
                                        torch.randn(weight.shape[1], generator=generator)) / weight.shape[1]**0.5
    return student


@pytest.mark.parametrize("full_parameters, lr, top_k", [(False, 1e-3, None), (True, 1e-4, 50)])
def test_distillation_lowers_the_kl_on_held_out_text(full_parameters: bool, lr: float, top_k: int | None) -> None:
    teacher, student = tiny_models.build("llama", torch.float32), damaged_student()
    before = held_out_kl(student, teacher)
    shapes = {name: p.shape for name, p in student.named_parameters()}
    student, result = finetune(student, tiny_models.random_batches(count=32, seed=5),
                               TrainingConfig(lr=lr, lora_r=4, seed=0, full_parameters=full_parameters),
                               distillation=Distillation(teacher, top_k=top_k), progress=False)
    assert result.steps == 32 and result.tokens == 32 * 2 * 24
    assert held_out_kl(student, teacher) < 0.85 * before  # measured: 0.75 (LoRA), 0.69 (every parameter)
    assert {name: p.shape for name, p in student.named_parameters()} == shapes
    assert not [name for name, _ in student.named_modules() if "lora" in name]
    assert not any(p.requires_grad for p in teacher.parameters())


def test_cli_distils_and_the_output_reloads_with_the_same_logits(sliced_dir: Path, dense_dir: Path,
                                                                  text_file: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import lmslice.cli.finetune_command as command

    saved: list[torch.Tensor] = []
    ids, mask = tiny_models.padded_inputs()

    def save_and_remember(model, *args, **kwargs):
        with torch.no_grad():
            saved.append(model(input_ids=ids, attention_mask=mask).logits)
        return lmslice.save_sliced(model, *args, **kwargs)

    monkeypatch.setattr(command, "save_sliced", save_and_remember)
    out = tmp_path / "distilled"
    code = main(["finetune", str(sliced_dir), "--data", str(text_file), "-o", str(out), "--distill-from",
                 str(dense_dir), "--temperature", "2", "--top-k", "20", "--lm-weight", "0.5", "--full-parameters",
                 "--samples", "4", "--seqlen", "32", "--batch-size", "2", "--lr", "1e-3", "--eval-seqlen", "64",
                 "--eval-max-windows", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 2 * 32 and summary["lora"] is None
    record = json.loads((out / "config.json").read_text())["lmslice"]["finetune"]
    assert record["distill"] == {"teacher": str(dense_dir), "temperature": 2.0, "top_k": 20, "lm_weight": 0.5}
    reloaded = lmslice.load(out)
    with torch.no_grad():
        logits = reloaded(input_ids=ids, attention_mask=mask).logits
    original = lmslice.load(sliced_dir)
    with torch.no_grad():
        assert (original(input_ids=ids, attention_mask=mask).logits - logits).abs().max() > 1e-3  # it trained
    assert (logits - saved[0]).abs().max() <= 1e-5


def test_a_teacher_with_another_vocabulary_is_refused(sliced_dir: Path, dense_dir: Path, text_file: Path,
                                                      tmp_path: Path, tiny_tokenizer, capsys) -> None:
    teacher = tmp_path / "teacher"
    lmslice.load(dense_dir).save_pretrained(teacher)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "never"
    code = main(["finetune", str(sliced_dir), "--data", str(text_file), "-o", str(out), "--distill-from",
                 str(teacher), "--samples", "2", "--seqlen", "32"])
    assert code != 0 and not out.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmslice: error")]
    assert len(errors) == 1 and "does not share the student's vocabulary" in errors[0]


@pytest.mark.parametrize("options, message", [
    (["--top-k", "5"], "apply to --distill-from"),
    (["--distill-from", "DENSE", "--temperature", "0"], "--temperature must be a positive number"),
    (["--distill-from", "DENSE", "--lm-weight", "-1"], "--lm-weight must be a number of at least 0"),
])
def test_bad_distillation_options_are_refused_before_loading(options: list[str], message: str, tmp_path: Path,
                                                             capsys) -> None:
    code = main(["finetune", "no-such-model", "--data", "pydoc", "-o", str(tmp_path / "out"), *options])
    assert code != 0 and message in capsys.readouterr().err


def test_distillation_settings_are_checked() -> None:
    with pytest.raises(LmsliceError, match="--top-k must be at least 1"):
        Distillation(tiny_models.build("llama", torch.float32), top_k=0)
