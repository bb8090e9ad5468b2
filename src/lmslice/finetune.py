"""Recovery fine-tuning (the paper's RFT): LoRA on a sliced model's block matrices, merged back in;
or every parameter trained; on the next-token loss or distilled from the dense model (`lmslice.distill`).

The sliced structure is untouched: LoRA adds a low-rank delta to the weights of the attention and MLP
linears (the shortcut projections included, since `ShortcutLinear` is an `nn.Linear`), and merging
folds it into those weights, so the result saves and loads like any sliced model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmslice.distill import Distillation
from lmslice.errors import LmsliceError
from lmslice.layout import layout_of

# The paper's RFT recipe (LoRA rank, alpha, dropout), and the reference implementation's learning rate.
LORA_R, LORA_ALPHA, LORA_DROPOUT, LEARNING_RATE = 32, 10.0, 0.05, 2e-4
# Training every parameter moves far more weights per step than LoRA's low-rank deltas: a smaller rate.
FULL_LEARNING_RATE = 2e-5


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float]
    seconds: float
    target_modules: list[str]  # the kinds of matrix adapted, e.g. "mlp.up_proj"
    stopped_by: str  # "data", "max_steps" or "time_budget"
    tokens: int  # training tokens seen (the masked-in positions of every batch)


def lora_targets(model: nn.Module) -> list[str]:
    """Every linear layer inside the decoder blocks, by full name.

    Left out: a projection that writes more features than the residual stream has (the last block
    when the head keeps its full width). It hands the surplus to the final norm and returns only the
    stream's part, which a LoRA delta of the full output width cannot be added to.
    """
    layout = layout_of(model.config)
    if layout is None:
        raise LmsliceError("recovery fine-tuning expects a sliced model; slice it first with `lmslice slice`")
    blocks = layout.modules.blocks + "."
    return [name for name, module in model.named_modules()
            if name.startswith(blocks) and isinstance(module, nn.Linear) and getattr(module, "widening", None) is None]


def finetune(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *, lr: float = LEARNING_RATE,
             r: int = LORA_R, alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT,
             max_steps: int | None = None, time_budget: float | None = None, seed: int = 42,
             full_parameters: bool = False, distillation: Distillation | None = None,
             on_step: Callable[[nn.Module, int, int], None] | None = None,
             progress: bool = True) -> tuple[nn.Module, FinetuneResult]:
    """One pass of training over `batches` (one optimizer step each), stopped early by `max_steps` or
    after `time_budget` seconds; returns the trained model (the same object, changed in place) and what
    training did.

    The loss is the next-token cross-entropy, or with `distillation` the teacher's KL term (see
    `lmslice.distill`). LoRA adapters are trained and merged into the weights, or with `full_parameters`
    every parameter is trained. `on_step(model, steps, tokens)` runs after each step (e.g. to measure
    the model mid-run; it may switch the model to eval mode)."""
    if not batches:
        raise LmsliceError("no training batches")
    start = time.perf_counter()
    torch.manual_seed(seed)  # LoRA's initialisation and dropout
    if full_parameters:
        trained, kinds = model, ["all parameters"]
        model.requires_grad_(True)
    else:
        trained, targets = _with_lora(model, r, alpha, dropout)
        # "model.layers.3.mlp.up_proj" -> "mlp.up_proj": which kinds of matrix were adapted
        prefix = len(layout_of(model.config).modules.blocks) + 1
        kinds = sorted({name[prefix:].split(".", 1)[1] for name in targets})
    _set_checkpointing(model, True)
    trained.train()
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    total = len(batches) if max_steps is None else min(len(batches), max_steps)
    losses: list[float] = []
    tokens = 0
    stopped_by = "data" if total == len(batches) else "max_steps"
    with tqdm(total=total, desc="distilling" if distillation else "fine-tuning", unit="step",
              disable=not progress) as bar:
        for batch in batches[:total]:
            if time_budget is not None and time.perf_counter() - start > time_budget:
                stopped_by = "time_budget"
                break
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            if distillation is None:
                loss = trained(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
            else:
                loss = distillation.loss(trained, ids, mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(mask.sum())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(trained, len(losses), tokens)
                trained.train()
    _set_checkpointing(model, False)
    del optimizer  # AdamW's two copies of the trained weights, before the caller saves or measures
    if full_parameters:
        model.requires_grad_(False)
        result = model.eval()
    else:
        result = trained.merge_and_unload().eval()
    return result, FinetuneResult(len(losses), losses, time.perf_counter() - start, kinds, stopped_by, tokens)


def _with_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> tuple[nn.Module, list[str]]:
    """`model` wrapped with LoRA adapters on every block linear, and those linears' names."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise LmsliceError("recovery fine-tuning needs peft: pip install 'lmslice[finetune]'") from error
    targets = lora_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with warnings.catch_warnings():  # peft still asks transformers for a renamed attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config), targets


def _set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Recomputes each block's activations in the backward pass instead of storing them (less memory).
    Non-reentrant, which needs no gradient on the (frozen) inputs. Newer transformers rename the methods."""
    if enable:
        method = getattr(model, "activation_checkpointing_enable", None)
        if method is not None:
            method(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
