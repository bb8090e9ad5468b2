"""Recovery fine-tuning: LoRA training lowers the loss, merges into a sliced model that saves and reloads
with the same structure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.evaluation.perplexity import perplexity
from lmslice.finetune import TrainingConfig, finetune, lora_targets
from lmslice.io.data import load_text, tokenize
from lmslice.modeling import ShortcutLinear
from lmslice.slicing import slice_model


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    model = tiny_models.build("llama", torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    return lmslice.save_sliced(model, tiny_tokenizer, tmp_path_factory.mktemp("finetune") / "sliced")


def mean_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        losses = []
        for batch in batches:
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)))
    return torch.stack(losses).mean().item()


def test_training_lowers_the_loss_and_keeps_the_structure(sliced_dir: Path) -> None:
    model = lmslice.load(sliced_dir)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    batches = tiny_models.random_batches(count=2, seed=3)
    before = mean_loss(model, batches)
    model, result = finetune(model, batches * 4, TrainingConfig(lr=1e-2, lora_r=4, seed=0), progress=False)
    assert result.steps == 8 and result.stopped_by == "data" and len(result.losses) == 8
    assert mean_loss(model, batches) < before
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == shapes
    assert not [name for name, _ in model.named_modules() if "lora" in name]
    assert isinstance(model.model.layers[0].self_attn.o_proj, ShortcutLinear)
    assert "self_attn.o_proj" in result.target_modules and "mlp.down_proj" in result.target_modules


def test_merging_keeps_what_the_trained_adapters_compute(sliced_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merged model (LoRA folded into the weights of every adapted matrix, shortcut projections
    included) computes what the model with its trained adapters computed just before merging."""
    from peft.tuners.lora import LoraModel

    ids, mask = tiny_models.padded_inputs()
    unmerged: list[torch.Tensor] = []
    merge_and_unload = LoraModel.merge_and_unload

    def measure_then_merge(self, *args, **kwargs):
        self.eval()  # LoRA dropout off, as in the merged model
        with torch.no_grad():
            unmerged.append(self.model(input_ids=ids, attention_mask=mask).logits)
        return merge_and_unload(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "merge_and_unload", measure_then_merge)
    original = lmslice.load(sliced_dir)
    with torch.no_grad():
        before = original(ids, attention_mask=mask).logits
    merged, _ = finetune(lmslice.load(sliced_dir), tiny_models.random_batches(count=2, seed=3),
                         TrainingConfig(lr=1e-2, lora_r=4, seed=0), progress=False)
    with torch.no_grad():
        after = merged(ids, attention_mask=mask).logits
    assert (unmerged[0] - before).abs().max() > 0.05  # training changed the model
    assert (after - unmerged[0]).abs().max() <= 1e-5


def test_steps_and_time_budget_stop_training(sliced_dir: Path) -> None:
    batches = tiny_models.random_batches(count=4)
    model, by_steps = finetune(lmslice.load(sliced_dir), batches, TrainingConfig(max_steps=2), progress=False)
    assert (by_steps.steps, by_steps.stopped_by) == (2, "max_steps")
    # LoRA can wrap a merged model again
    _, by_time = finetune(model, batches, TrainingConfig(time_budget=0), progress=False)
    assert (by_time.steps, by_time.stopped_by) == (0, "time_budget")


def test_a_dense_model_gets_adapters_on_its_block_linears() -> None:
    model = tiny_models.build("llama", torch.float32)
    targets = lora_targets(model)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert targets == [name for name in linears if name.startswith("model.layers.")] and "lm_head" not in targets


def test_cli_saves_a_merged_model_that_reloads(sliced_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "recovered"
    code = main(["finetune", str(sliced_dir), "--data", str(text_file), "-o", str(out), "--samples", "6",
                 "--seqlen", "32", "--batch-size", "2", "--lr", "5e-3", "--lora-r", "4", "--eval-seqlen", "64",
                 "--eval-max-windows", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["perplexity_after"]["perplexity"] > 0

    original, (recovered, tokenizer) = lmslice.load(sliced_dir), lmslice.load_with_tokenizer(out)
    assert ({name: p.shape for name, p in recovered.named_parameters()}
            == {name: p.shape for name, p in original.named_parameters()})
    record = json.loads((out / "config.json").read_text())["lmslice"]
    assert record["width"] == original.config.lmslice["width"]
    assert record["finetune"]["lora"]["r"] == 4 and record["finetune"]["steps"] == 3
    changed = [name for name, p in recovered.named_parameters()
               if not torch.equal(p, original.get_parameter(name))]
    assert changed and all(name.startswith("model.layers.") for name in changed)
    # the reloaded model measures what the merged model measured before saving
    tokens = tokenize(tokenizer, load_text(str(text_file), split="test"))
    reloaded = perplexity(recovered, tokens, 64, max_windows=2, progress=False).perplexity
    assert reloaded == pytest.approx(summary["perplexity_after"]["perplexity"], rel=1e-5)


def test_each_step_is_reported_with_the_tokens_seen(sliced_dir: Path) -> None:
    seen: list[tuple[int, int, bool]] = []
    batches = tiny_models.random_batches(count=4)  # 2 windows of 24 tokens each

    def on_step(model: torch.nn.Module, steps: int, tokens: int) -> None:
        seen.append((steps, tokens, model.training))
        model.eval()  # a measurement may switch to eval mode; training switches back

    _, result = finetune(lmslice.load(sliced_dir), batches, TrainingConfig(max_steps=3), on_step=on_step,
                         progress=False)
    assert seen == [(1, 48, True), (2, 96, True), (3, 144, True)] and result.tokens == 144


def test_the_cosine_schedule_warms_up_then_decays_to_zero(sliced_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rate each optimizer step really used: a linear warm-up over the first quarter of the steps to
    the peak, then a cosine decay that reaches 0 one step past the last; constant is the peak throughout."""
    used: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    batches = tiny_models.random_batches(count=8)
    finetune(lmslice.load(sliced_dir), batches, TrainingConfig(lr=0.1, schedule="cosine", warmup=0.25), progress=False)
    expected = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert used == pytest.approx(expected, rel=1e-12)
    used.clear()
    finetune(lmslice.load(sliced_dir), batches, TrainingConfig(lr=0.1), progress=False)
    assert used == pytest.approx([0.1] * 8, rel=1e-12)


@pytest.mark.parametrize("settings, message", [
    ({"lr": 0.0}, "learning rate must be a positive number"),
    ({"schedule": "linear"}, "unknown learning-rate schedule"),
    ({"warmup": 1.0}, "warm-up share"),
    ({"lora_r": 0}, "LoRA needs a rank"),
    ({"max_steps": 0}, "step limit"),
])
def test_training_configs_refuse_bad_settings_when_made(settings: dict, message: str) -> None:
    with pytest.raises(LmsliceError, match=message):
        TrainingConfig(**settings)


def test_cli_refuses_a_warmup_without_the_cosine_schedule(sliced_dir: Path, text_file: Path, tmp_path: Path,
                                                          capsys) -> None:
    code = main(["finetune", str(sliced_dir), "--data", str(text_file), "-o", str(tmp_path / "out"), "--warmup", "0.1"])
    assert code == 2 and capsys.readouterr().err == "lmslice: error: --warmup applies to --schedule cosine\n"
    assert not (tmp_path / "out").exists()
