"""The residual channel that links a sliced block's norms to its projections holds no state across
forwards: a forward cut short, or a block recomputed for checkpointing, leaves the next forward exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

import tiny_models
from lmslice.finetune import _set_checkpointing
from lmslice.slicing import slice_model


def sliced(family: str) -> torch.nn.Module:
    model = tiny_models.build(family, torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)  # the head keeps its full width
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_checkpoint_recompute_without_early_stop_leaves_no_state(family: str) -> None:
    """Recomputing the last block in the backward pass runs its projections again, after the final norm
    has taken their surplus features; the next forward must not see them."""
    model = sliced(family)
    expected = logits(model)
    _set_checkpointing(model, True)
    model.train()
    ids, mask = tiny_models.padded_inputs()
    with set_checkpoint_early_stop(False):
        model(ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    _set_checkpointing(model, False)
    model.eval()
    assert torch.equal(logits(model), expected)


class Interrupted(Exception):
    pass


def interrupt(*_: object) -> None:
    raise Interrupted


@pytest.mark.parametrize("family", ["phi", "gpt_neox"])
def test_a_forward_interrupted_inside_the_last_block_leaves_no_state(family: str) -> None:
    """Parallel families' last connection has two writers: interrupting between them leaves the first
    one's surplus features behind."""
    model = sliced(family)
    expected = logits(model)
    last_block = model.get_submodule(model.config.lmslice["modules"]["blocks"])[-1]
    writers = model.config.lmslice["modules"]["residuals"][-1]["writes"]
    victim = last_block.get_submodule(writers[-1]).register_forward_pre_hook(interrupt)
    with pytest.raises(Interrupted):
        logits(model)
    victim.remove()
    assert torch.equal(logits(model), expected)
