"""Recovery fine-tuning (the paper's RFT): LoRA on a sliced model's block matrices, merged back in.

The sliced structure is untouched: LoRA adds a low-rank delta to the weights of the attention and MLP
linears (the shortcut projections included, since `ShortcutLinear` is an `nn.Linear`), and merging
folds it into those weights, so the result saves and loads like any sliced model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmslice.errors import LmsliceError
from lmslice.layout import layout_of

# The paper's RFT recipe (LoRA rank, alpha, dropout), and the reference implementation's learning rate.
LORA_R, LORA_ALPHA, LORA_DROPOUT, LEARNING_RATE = 32, 10.0, 0.05, 2e-4


@dataclass
class FinetuneResult:
    steps: int
    losses: list[float]
    seconds: float
    target_modules: list[str]  # the kinds of matrix adapted, e.g. "mlp.up_proj"
    stopped_by: str  # "data", "max_steps" or "time_budget"


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
             progress: bool = True) -> tuple[nn.Module, FinetuneResult]:
    """One pass of causal-LM training over `batches` (one optimizer step each) with LoRA adapters,
    stopped early by `max_steps` or after `time_budget` seconds; returns the model with LoRA merged
    into its weights (the same object, changed in place) and what training did."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise LmsliceError("recovery fine-tuning needs peft: pip install 'lmslice[finetune]'") from error
    if not batches:
        raise LmsliceError("no training batches")
    start = time.perf_counter()
    targets = lora_targets(model)
    torch.manual_seed(seed)  # LoRA's initialisation and dropout
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with warnings.catch_warnings():  # peft still asks transformers for a renamed attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    _set_checkpointing(model, True)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    total = len(batches) if max_steps is None else min(len(batches), max_steps)
    losses: list[float] = []
    stopped_by = "data" if total == len(batches) else "max_steps"
    with tqdm(total=total, desc="fine-tuning", unit="step", disable=not progress) as bar:
        for batch in batches[:total]:
            if time_budget is not None and time.perf_counter() - start > time_budget:
                stopped_by = "time_budget"
                break
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    _set_checkpointing(model, False)
    merged = peft_model.merge_and_unload().eval()
    # "model.layers.3.mlp.up_proj" -> "mlp.up_proj": which kinds of matrix were adapted
    prefix = len(layout_of(model.config).modules.blocks) + 1
    kinds = sorted({name[prefix:].split(".", 1)[1] for name in targets})
    return merged, FinetuneResult(len(losses), losses, time.perf_counter() - start, kinds, stopped_by)


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
