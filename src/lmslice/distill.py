"""Distillation from the dense model: the teacher's next-token distribution as the student's target.

The recipe of Minitron and Sheared-LLaMA: a pruned student and its dense teacher side by side, the
KL divergence between their softened distributions as the loss (Hinton's T^2 scaling keeps gradients
comparable across temperatures), plus an optional share of the usual next-token loss. The teacher runs
batch by batch under no_grad, so memory is about one teacher plus one training student.

`finetune` runs the training loop; this module only supplies the loss (`Distillation.loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmslice.errors import LmsliceError


@dataclass
class Distillation:
    teacher: nn.Module
    temperature: float = 1.0
    top_k: int | None = None  # the teacher's k most likely tokens as the target (None: the full vocabulary)
    lm_weight: float = 0.0  # weight of the next-token cross-entropy added to the KL term

    def __post_init__(self) -> None:
        check_settings(self.temperature, self.top_k, self.lm_weight)
        self.teacher.eval().requires_grad_(False)

    def loss(self, student: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = distillation_loss(logits, teacher_logits, mask, self.temperature, self.top_k)
        if self.lm_weight:
            loss = loss + self.lm_weight * next_token_loss(logits, ids, mask)
        return loss


def check_settings(temperature: float, top_k: int | None, lm_weight: float) -> None:
    """Refuses settings the loss cannot use (NaN and infinities included) before any model is loaded."""
    if not 0 < temperature < math.inf:
        raise LmsliceError(f"--temperature must be a positive number, got {temperature:g}")
    if top_k is not None and top_k < 1:
        raise LmsliceError(f"--top-k must be at least 1, got {top_k}")
    if not 0 <= lm_weight < math.inf:
        raise LmsliceError(f"--lm-weight must be a number of at least 0, got {lm_weight:g}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the distributions at temperature T, averaged over the positions
    `mask` keeps. With `top_k`, both distributions are renormalised over the teacher's k most likely
    tokens (so the loss is 0 exactly when the student matches the teacher there)."""
    student_logits, teacher_logits = student_logits.float() / temperature, teacher_logits.float() / temperature
    if top_k is not None and top_k < teacher_logits.shape[-1]:
        teacher_logits, indices = teacher_logits.topk(top_k, dim=-1)
        student_logits = student_logits.gather(-1, indices)
    teacher_log_probs = teacher_logits.log_softmax(-1)
    per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_logits.log_softmax(-1))).sum(-1)
    keep = mask.to(per_token.dtype)
    return temperature**2 * (per_token * keep).sum() / keep.sum().clamp(min=1)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each kept position's prediction of the next (kept) token."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def check_same_vocabulary(student: nn.Module, student_tokenizer: PreTrainedTokenizerBase,
                          teacher: nn.Module, teacher_tokenizer: PreTrainedTokenizerBase, teacher_name: str) -> None:
    """The student learns the teacher's distribution token by token, so both must share the vocabulary."""
    rows = (student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if rows[0] != rows[1]:
        difference = f"it predicts {rows[1]} tokens, the student {rows[0]}"
    elif student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        difference = "their tokenizers map tokens to different ids"
    else:
        return
    raise LmsliceError(f"the teacher {teacher_name} does not share the student's vocabulary ({difference}): "
                       "distil from the model the student was sliced from")
