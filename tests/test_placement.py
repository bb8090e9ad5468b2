"""Wherever the blocks live (in memory, streamed from CPU memory, on disk), every step and every composition
of steps gives the same model, and the Fisher measured block by block is the whole model's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lmslice
import tiny_models
from lmslice.adapters import find_adapter
from lmslice.io.offload import open_offloaded, save_offloaded
from lmslice.modeling import get_module
from lmslice.pipeline import (Prune, PruneConfig, Slice, SliceConfig, StandardFormat, StandardFormatConfig, compress)
from lmslice.prune import consumer_sensitivity
from lmslice.walk import DeviceStreamed, Run
from test_adapters import REPRESENTATIVES, SLICEABLE

RECIPES = {
    "slice+prune": [Slice(SliceConfig(0.25, slice_head=True)), Prune(PruneConfig(0.8))],
    "uniform": [Prune(PruneConfig(0.8, widths="uniform"))],
    "prune+slice": [Prune(PruneConfig(0.8)), Slice(SliceConfig(0.25))],
    "prune": [Prune(PruneConfig(0.8))],
    "standard": [Slice(SliceConfig(0.25, rotation="shared")), Prune(PruneConfig(0.8, widths="uniform")),
                 StandardFormat(StandardFormatConfig(False))],
}
# a family whose blocks cannot be sliced (norms after the sublayers) is pruned
CASES = [(family, "slice+prune" if family in SLICEABLE else "prune") for family in REPRESENTATIVES] + [
    ("llama", "uniform"), ("phi", "uniform"), ("llama", "prune+slice"), ("llama", "standard"), ("gemma", "standard")]


def logits(model: nn.Module) -> torch.Tensor:
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family, recipe", CASES)
def test_every_placement_gives_the_model_made_in_memory(family: str, recipe: str, tmp_path: Path) -> None:
    dense = tiny_models.build(family, torch.float64)
    batches = tiny_models.random_batches()
    steps = RECIPES[recipe]
    in_memory = compress(copy.deepcopy(dense), batches, steps, progress=False).model
    expected = logits(in_memory)

    streamed = compress(copy.deepcopy(dense), batches, steps, progress=False,
                        placement=DeviceStreamed("cpu", torch.float64, torch.float64), activations="cpu").model
    torch.testing.assert_close(logits(streamed), expected, rtol=0, atol=1e-9)

    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")  # several shards
    model, storage = open_offloaded(tmp_path / "dense", tmp_path / "out", dtype=torch.float64, device="cpu")
    offloaded = compress(model, batches, steps, progress=False, placement=storage, activations=str(tmp_path))
    save_offloaded(offloaded.model, storage, None, tmp_path / "out", overwrite=False)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging or spill left
    reloaded = lmslice.load(tmp_path / "out", dtype="float64")
    # the reference is reloaded too: a standard Gemma's embedding scale is recomputed on load (float32 √hidden)
    lmslice.save_sliced(in_memory, None, tmp_path / "memory")
    torch.testing.assert_close(logits(reloaded), logits(lmslice.load(tmp_path / "memory", dtype="float64")),
                               rtol=0, atol=1e-9)


def whole_model_sensitivity(model: nn.Module, batches: list[dict[str, Any]], paths: list[str]) -> dict[str, list]:
    """Σ (∂L/∂y)² of every feature y the layers at `paths` write, from one backward through the whole model."""
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    sums: dict[str, list] = {path: [None] * len(blocks) for path in paths}

    def track(path: str, index: int):
        def hook(module, args, output) -> None:
            def accumulate(gradient: torch.Tensor) -> None:
                squares = gradient.double().pow(2).reshape(-1, gradient.shape[-1]).sum(0)
                sums[path][index] = squares if sums[path][index] is None else sums[path][index] + squares
            output.register_hook(accumulate)
        return hook

    handles = [get_module(block, path).register_forward_hook(track(path, index))
               for path in paths for index, block in enumerate(blocks)]
    handles.append(blocks[0].register_forward_pre_hook(lambda module, args: args[0].requires_grad_()))
    try:
        for batch in batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            for row in range(len(labels)):
                loss = model(input_ids=batch["input_ids"][row:row + 1], attention_mask=batch["attention_mask"][row:row + 1],
                             labels=labels[row:row + 1], use_cache=False).loss
                (loss * (labels[row:row + 1, 1:] != -100).sum()).backward()
    finally:
        for handle in handles:
            handle.remove()
    return sums


@pytest.mark.parametrize("family", REPRESENTATIVES)
def test_the_block_by_block_fisher_is_the_whole_models(family: str, tmp_path: Path) -> None:
    model = tiny_models.build(family, torch.float64)
    adapter = find_adapter(model)
    batches = tiny_models.random_batches()
    batches[1]["attention_mask"][0, :5] = 0  # padding takes no part
    paths = [adapter.mlp.consumer, adapter.attention.output]
    expected = whole_model_sensitivity(copy.deepcopy(model), batches, paths)
    for activations in (None, str(tmp_path)):
        got = consumer_sensitivity(model, adapter, batches, paths, Run(0, activations=activations))
        for path in paths:
            for block_got, block_expected in zip(got[path], expected[path]):
                torch.testing.assert_close(block_got, block_expected, rtol=1e-10, atol=0)
    assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())
    assert not list(tmp_path.iterdir())  # every stored input and gradient taken back
