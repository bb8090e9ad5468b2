"""On a CUDA device (skipped without one; CI has none): slicing and pruning give what they give on the
CPU, and distillation trains in bfloat16 autocast with float32 weights."""

from __future__ import annotations

import pytest
import torch

import lmslice
import tiny_models
from lmslice.distill import Distillation
from lmslice.finetune import TrainingConfig, finetune
from lmslice.layout import layout_of
from lmslice.pipeline import Prune, PruneConfig, Slice, SliceConfig
from test_distill import damaged_student

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = tiny_models.padded_inputs()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()


@pytest.mark.parametrize("step", [Slice(SliceConfig(0.25, slice_head=True)), Prune(PruneConfig(0.7))],
                         ids=["slice", "prune"])
def test_compressing_on_cuda_gives_what_the_cpu_gives(step) -> None:
    """float64 on both: the same structure (widths, heads) and the same logits to 1e-5 (measured on an
    H200: 2.1e-7 sliced, 6.3e-7 pruned)."""
    batches = tiny_models.random_batches()
    on_cpu = lmslice.compress(tiny_models.build("llama", torch.float64), batches, [step]).model
    on_cuda = lmslice.compress(tiny_models.build("llama", torch.float64).cuda(), batches, [step]).model
    cpu_layout, cuda_layout = layout_of(on_cpu.config), layout_of(on_cuda.config)
    assert (cuda_layout.stream, cuda_layout.mlp_widths, cuda_layout.attention_heads) == (
        cpu_layout.stream, cpu_layout.mlp_widths, cpu_layout.attention_heads)
    torch.testing.assert_close(logits(on_cuda), logits(on_cpu), rtol=0, atol=1e-5)


def test_distillation_trains_in_bfloat16_autocast_on_cuda() -> None:
    teacher, student = tiny_models.build("llama", torch.float32).cuda(), damaged_student().cuda()
    distillation = Distillation(teacher)
    held_out = [{key: value.cuda() for key, value in batch.items()}
                for batch in tiny_models.random_batches(count=2, seed=11)]

    def kl() -> float:
        with torch.no_grad():
            return sum(distillation.loss(student, b["input_ids"], b["attention_mask"]).item() for b in held_out)

    before = kl()
    dtypes: list[torch.dtype] = []  # of the head's output in each training step
    hook = student.lm_head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    student, result = finetune(student, tiny_models.random_batches(count=32, seed=5),
                               TrainingConfig(lr=1e-4, full_parameters=True, schedule="cosine", warmup=0.1,
                                              checkpointing=False),
                               distillation=distillation, progress=False)
    hook.remove()
    assert dtypes == [torch.bfloat16] * 32
    assert result.steps == 32 and kl() < 0.85 * before
    assert all(parameter.dtype == torch.float32 for parameter in student.parameters())
