"""The calibration stream is the sliced model's own: what slicing computes for block k is what the sliced
blocks 0..k-1 really feed block k, and padding tokens take no part in any basis."""

from __future__ import annotations

import copy

import pytest
import torch

import lmslice.slicing
import tiny_models
from lmslice.calibration import GRAM_BLOCKED_FROM, add_gram
from lmslice.slicing import slice_model
from test_adapters import SLICEABLE


def block_inputs(model: torch.nn.Module, batches: list[dict]) -> list[list[torch.Tensor]]:
    """[block][batch] the hidden states each block of `model` receives."""
    blocks = model.get_submodule(model.config.lmslice["modules"]["blocks"])
    received: list[list[torch.Tensor]] = [[] for _ in blocks]

    def keep(index: int):
        def hook(module, args, kwargs) -> None:
            received[index].append((args[0] if args else kwargs["hidden_states"]).clone())
        return hook

    handles = [block.register_forward_pre_hook(keep(index), with_kwargs=True) for index, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return received


@pytest.mark.parametrize("family", SLICEABLE)
def test_calibration_stream_is_what_the_sliced_blocks_produce(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block k is calibrated on a simulated stream (unrotated blocks, inner connections projected by
    hooks); it must equal the stream of the finished sliced model, in float64 to rounding."""
    simulated: list[list[torch.Tensor]] = []
    block_signals = lmslice.slicing.block_signals

    def recording_block_signals(block, adapter, streams, *args, **kwargs):
        simulated.append([stream.hidden.clone() for stream in streams])
        return block_signals(block, adapter, streams, *args, **kwargs)

    monkeypatch.setattr(lmslice.slicing, "block_signals", recording_block_signals)
    model = tiny_models.build(family, torch.float64)
    batches = tiny_models.random_batches()
    result = slice_model(model, batches, 0.25, progress=False)
    assert result.width < result.hidden_size
    real = block_inputs(model, batches)
    assert len(simulated) == len(real) == model.config.num_hidden_layers
    for index, (expected, received) in enumerate(zip(simulated, real)):
        for batch, (calibrated, actual) in enumerate(zip(expected, received)):
            assert actual.shape == calibrated.shape == (*batches[batch]["input_ids"].shape, result.width)
            error = (actual - calibrated).abs().max() / actual.abs().max()
            assert error < 1e-10, f"block {index}, batch {batch}: relative error {error:.3g}"


@pytest.mark.parametrize("family", ["llama", "opt", "phi"])
def test_left_padding_gives_the_bases_of_the_unpadded_rows(family: str) -> None:
    """One batch with a row left-padded by ten tokens (padding ids random, mask zero) against the same
    rows as two unpadded batches: the same spectra, and the same sliced model. (More real tokens than
    the width, so that no kept component is an arbitrary direction of an empty subspace.)"""
    generator = torch.Generator().manual_seed(4)
    long_row = torch.randint(0, tiny_models.VOCAB, (1, 60), generator=generator)
    short_row = torch.randint(0, tiny_models.VOCAB, (1, 50), generator=generator)
    padding = torch.randint(0, tiny_models.VOCAB, (1, 10), generator=generator)
    padded_ids = torch.cat([long_row, torch.cat([padding, short_row], dim=1)])
    padded_mask = torch.ones_like(padded_ids)
    padded_mask[1, :10] = 0
    padded = [{"input_ids": padded_ids, "attention_mask": padded_mask}]
    unpadded = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in (long_row, short_row)]

    dense = tiny_models.build(family, torch.float64)
    models, spectra = [], []
    for batches in (padded, unpadded):
        model = copy.deepcopy(dense)
        spectra.append(slice_model(model, batches, 0.25, progress=False).spectra)
        models.append(model)
    assert spectra[0].keys() == spectra[1].keys()
    # 1e-6, not float64's 1e-15: the padded row sits ten positions later, and rotary tables are float32.
    # Counting the padding would move the spectra by about 10% (10 of 110 tokens).
    for name in spectra[0]:
        padded_values, unpadded_values = (torch.tensor(spectrum[name], dtype=torch.float64) for spectrum in spectra)
        scale = unpadded_values.abs().max()
        assert (padded_values - unpadded_values).abs().max() <= 1e-6 * scale, name
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        padded_logits, unpadded_logits = (model(ids, attention_mask=mask).logits[mask.bool()] for model in models)
    assert (padded_logits - unpadded_logits).abs().max() <= 1e-6


@pytest.mark.parametrize("width", [GRAM_BLOCKED_FROM - 1, GRAM_BLOCKED_FROM + 5])
def test_a_gram_matrix_from_its_lower_blocks_is_the_full_product(width: int) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(64, width, generator=generator, dtype=torch.float64) * torch.rand(width, generator=generator,
                                                                                          dtype=torch.float64)
    matrix = torch.eye(width, dtype=torch.float64)  # what earlier batches added
    add_gram(matrix, rows)
    torch.testing.assert_close(matrix, torch.eye(width, dtype=torch.float64) + rows.T @ rows, rtol=1e-12, atol=1e-12)
