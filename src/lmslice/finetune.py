"""Recovery fine-tuning (the paper's RFT): LoRA on a compressed (or dense) model's block matrices, merged back in;
or every parameter trained; on the next-token loss or distilled from the dense model (`lmslice.distill`).

The sliced structure is untouched: LoRA adds a low-rank delta to the weights of the attention and MLP
linears (the shortcut projections included, since `ShortcutLinear` is an `nn.Linear`), and merging
folds it into those weights, so the result saves and loads like any sliced model.

Started by `accelerate launch` (or torchrun) in several processes, training is data-parallel: every process
holds the whole model and trains on its own share of each batch, and their gradients are averaged.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from lmslice.adapters import find_adapter
from lmslice.distill import Distillation
from lmslice.errors import LmsliceError
from lmslice.io.data import check_batches
from lmslice.layout import layout_of

# The paper's RFT recipe (LoRA rank, alpha, dropout), and the reference implementation's learning rate.
LORA_R, LORA_ALPHA, LORA_DROPOUT, LEARNING_RATE = 32, 10.0, 0.05, 2e-4
# Training every parameter moves far more weights per step than LoRA's low-rank deltas: a smaller rate.
FULL_LEARNING_RATE = 2e-5
SCHEDULES = ("constant", "cosine")
# Launches that split the model itself between processes: training could step the shards, but merging LoRA and
# saving work on the whole model in one process's memory.
SHARDED_TRAINING = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


@dataclass(frozen=True)
class TrainingConfig:
    """How `finetune` trains. The defaults are the paper's RFT: LoRA at a constant learning rate."""

    lr: float | None = None  # AdamW's (peak) rate; None: LEARNING_RATE with LoRA, FULL_LEARNING_RATE for every weight
    full_parameters: bool = False  # train every weight instead of LoRA adapters
    lora_r: int = LORA_R
    lora_alpha: float = LORA_ALPHA
    lora_dropout: float = LORA_DROPOUT
    # "cosine": linear warm-up over the first `warmup` share of the steps, then a cosine decay to 0 at the last
    schedule: str = "constant"
    warmup: float = 0.0
    max_steps: int | None = None  # stop after this many steps (None: one pass over the batches)
    time_budget: float | None = None  # start no new step after this many seconds
    seed: int = 42  # LoRA's initialisation and dropout
    # recompute each block's activations in the backward pass: less memory for about a third more compute
    checkpointing: bool = True
    # bfloat16 autocast (the weights and AdamW's state stay float32) where the device has fast bfloat16: CUDA
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise LmsliceError(f"the learning rate must be a positive number, got {self.lr:g}")
        if self.schedule not in SCHEDULES:
            raise LmsliceError(f"unknown learning-rate schedule {self.schedule!r}; give one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise LmsliceError(f"the warm-up share of the steps must be in [0, 1), got {self.warmup:g}")
        if self.lora_r < 1 or not 0 < self.lora_alpha < math.inf or not 0 <= self.lora_dropout < 1:
            raise LmsliceError(f"LoRA needs a rank of at least 1, a positive alpha and a dropout in [0, 1), got "
                               f"{self.lora_r}, {self.lora_alpha:g}, {self.lora_dropout:g}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LmsliceError(f"the step limit must be at least 1, got {self.max_steps}")
        if self.time_budget is not None and not 0 <= self.time_budget < math.inf:
            raise LmsliceError(f"the time budget must be a number of seconds, at least 0, got {self.time_budget:g}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else FULL_LEARNING_RATE if self.full_parameters else LEARNING_RATE

    def rate_factor(self, step: int, total: int) -> float:
        """The share of the peak rate that step `step` (from 0) of `total` trains at."""
        if self.schedule == "constant":
            return 1.0
        warmup = int(self.warmup * total)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
    blocks = block_path(model) + "."
    return [name for name, module in model.named_modules()
            if name.startswith(blocks) and isinstance(module, nn.Linear) and getattr(module, "widening", None) is None]


def block_path(model: nn.Module) -> str:
    """Where `model`'s decoder blocks are: as its lmslice record says, or for a dense model its family's adapter."""
    layout = layout_of(model.config)
    return layout.modules.blocks if layout is not None else find_adapter(model).blocks


def finetune(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: TrainingConfig = TrainingConfig(),
             *, distillation: Distillation | None = None,
             on_step: Callable[[nn.Module, int, int], None] | None = None,
             progress: bool = True) -> tuple[nn.Module, FinetuneResult]:
    """One pass of training over `batches` (one optimizer step each), stopped early by `config.max_steps`
    or after `config.time_budget` seconds; returns the trained model (the same object, changed in place)
    and what training did.

    The loss is the next-token cross-entropy, or with `distillation` the teacher's KL term (see
    `lmslice.distill`). LoRA adapters are trained and merged into the weights, or with
    `config.full_parameters` every parameter is trained. `on_step(model, steps, tokens)` runs after each
    step (e.g. to measure the model mid-run; it may switch the model to eval mode).

    In several processes (`accelerate launch`), each batch is split between them: the model (and the
    teacher) must be on each process's device, every batch needs a window per process, and the result is
    the one process's up to rounding (exactly its gradient where every window counts the same number of
    positions, as the CLI's windows do). Every process returns the trained model."""
    batches = check_batches(batches, model.get_input_embeddings().weight.shape[0], "training")
    start = time.perf_counter()
    device = next(model.parameters()).device
    # The caller placed the model: one process keeps it where it is (the CPU on a CUDA machine, say).
    accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False)
    check_data_parallel(accelerator.distributed_type)
    check_shares([len(batch["input_ids"]) for batch in batches], accelerator.num_processes)
    torch.manual_seed(config.seed)  # LoRA's initialisation and dropout
    if config.full_parameters:
        trained, kinds = model, ["all parameters"]
        model.requires_grad_(True)
    else:
        trained, targets = _with_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout)
        # "model.layers.3.mlp.up_proj" -> "mlp.up_proj": which kinds of matrix were adapted
        prefix = len(block_path(model)) + 1
        kinds = sorted({name[prefix:].split(".", 1)[1] for name in targets})
    if accelerator.process_index:  # dropout masks of their own for the other shares; the first keeps one process's
        torch.manual_seed(config.seed + accelerator.process_index)
    _set_checkpointing(model, config.checkpointing)
    trained.train()
    wrapped = accelerator.prepare(trained)  # data-parallel across processes; in one process, `trained` itself
    total = len(batches) if config.max_steps is None else min(len(batches), config.max_steps)
    weights = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weights, lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.rate_factor(step, total))
    optimizer = accelerator.prepare(optimizer)  # not the schedule: it counts optimizer steps, not processes' steps
    losses: list[float] = []
    tokens = 0
    stopped_by = "data" if total == len(batches) else "max_steps"
    with tqdm(total=total, desc="distilling" if distillation else "fine-tuning", unit="step",
              disable=not (progress and accelerator.is_main_process)) as bar:
        for batch in batches[:total]:
            # every process must stop at the same step, or the others wait for it forever
            if config.time_budget is not None and _on_any_process(
                    accelerator, time.perf_counter() - start > config.time_budget):
                stopped_by = "time_budget"
                break
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids))
            share_ids, share_mask = (_share(tensor, accelerator).to(device) for tensor in (ids, mask))
            with _autocast(device, config.mixed_precision):
                if distillation is None:
                    loss = wrapped(input_ids=share_ids, attention_mask=share_mask, labels=share_ids,
                                   use_cache=False).loss
                else:
                    loss = distillation.loss(wrapped, share_ids, share_mask)
            # The processes' gradients are averaged: weighting each share's mean loss by its part of the batch's
            # windows makes that average the whole batch's gradient when the batch does not split evenly.
            loss = loss * (accelerator.num_processes * len(share_ids) / len(ids))
            batch_loss = accelerator.gather(loss.detach()[None]).mean()
            if not torch.isfinite(batch_loss):
                raise diverged(len(losses) + 1, f"its loss is {batch_loss.item()}")
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if not torch.stack([weight.isfinite().all() for weight in weights]).all():
                raise diverged(len(losses) + 1, "it left NaN or inf in the trained weights")
            losses.append(batch_loss.item())
            tokens += int(mask.sum())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(trained, len(losses), tokens)
                trained.train()
    _set_checkpointing(model, False)
    # AdamW's two copies of the trained weights (which the accelerator holds too), before the caller saves or measures
    accelerator.free_memory()
    del optimizer, schedule, wrapped
    if config.full_parameters:
        model.requires_grad_(False)
        result = model.eval()
    else:
        result = trained.merge_and_unload().eval()
    return result, FinetuneResult(len(losses), losses, time.perf_counter() - start, kinds, stopped_by, tokens)


def check_data_parallel(launch: DistributedType) -> None:
    if launch in SHARDED_TRAINING:
        raise LmsliceError(f"lmslice finetune trains data-parallel, not with {launch.value}: launch it with "
                           "`accelerate launch --multi_gpu` (each GPU holds the whole model; LoRA and gradient "
                           "checkpointing keep the rest of its training state small)")


def check_shares(batch_sizes: Sequence[int], processes: int) -> None:
    """Refuses a batch with fewer windows than the processes that split it: each must have one to train on."""
    for index, size in enumerate(batch_sizes):
        if size < processes:
            raise LmsliceError(f"training batch {index} has {size} windows, fewer than the {processes} processes "
                               "that split it: give every batch at least one window per process")


def _share(tensor: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """This process's consecutive rows of a batch (the first processes take one more when it does not split evenly)."""
    return tensor.tensor_split(accelerator.num_processes)[accelerator.process_index]


def _on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "sum"))


def diverged(step: int, how: str) -> LmsliceError:
    return LmsliceError(f"training diverged at step {step}: {how}; nothing was saved (lower --lr, or check the "
                        "training text and the distillation settings)")


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on a CUDA device with bfloat16 matrix units; elsewhere (CPUs without them are
    slower in bfloat16 than in float32) nothing."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
