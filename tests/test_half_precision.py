"""A sliced model runs in float16 and bfloat16 (norms, shortcuts and the widening tail included) and
computes what it computes in float32, to the precision of the format."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny_models
from lmslice.slicing import slice_model
from test_adapters import SLICEABLE

# Relative error (Frobenius norm over the real tokens' logits) at most 8 units of rounding of the format:
# 3.1e-2 for bfloat16, 3.9e-3 for float16. Measured on these models, worst family (Gemma): 1.9e-2 and 2.3e-3.
UNITS_OF_ROUNDING = 8


@pytest.mark.parametrize("slice_head", [False, True], ids=["full-head", "sliced-head"])
@pytest.mark.parametrize("family", SLICEABLE)
def test_half_precision_forward_is_within_rounding_of_float32(family: str, slice_head: bool) -> None:
    model = tiny_models.build(family, torch.float32)
    slice_model(model, tiny_models.random_batches(), 0.25, slice_head=slice_head, progress=False)
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits[mask.bool()]
        for dtype in (torch.bfloat16, torch.float16):
            logits = copy.deepcopy(model).to(dtype)(ids, attention_mask=mask).logits
            assert logits.dtype == dtype
            error = (logits[mask.bool()].float() - reference).norm() / reference.norm()
            bound = UNITS_OF_ROUNDING * torch.finfo(dtype).eps / 2
            assert error <= bound, f"{dtype}: relative error {error:.3g} > {bound:.3g}"
