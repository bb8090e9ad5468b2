"""The pipeline: typed configs refuse bad settings when made, `check_steps` refuses a list of steps that
cannot compose before any calibration (naming the step), `compress` gives what the passes give run by
hand and records the recipe once, and the one calibration walk always removes its hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lmslice
import tiny_models
from lmslice.calibration import StopForward, walk
from lmslice.errors import LmsliceError
from lmslice.layout import layout_of
from lmslice.pipeline import (Prune, PruneConfig, Slice, SliceConfig, StandardFormat, StandardFormatConfig,
                              check_steps, compress)
from lmslice.prune import prune_to_budget
from lmslice.slicing import slice_model


@pytest.mark.parametrize("make, message", [
    (lambda: SliceConfig(1.0), "sparsity must be in"),
    (lambda: SliceConfig(0.25, rotation="diagonal"), "unknown rotation"),
    (lambda: SliceConfig(0.25, weighting="loud"), "unknown basis weighting"),
    (lambda: PruneConfig(0.0), "target_params must be in"),
    (lambda: PruneConfig(0.8, round_to=0), "round_to must be a positive integer"),
    (lambda: PruneConfig(0.8, widths="wide"), "unknown MLP widths"),
    (lambda: PruneConfig(0.8, criterion="magnitude"), "unknown channel criterion"),
    (lambda: PruneConfig(0.8, widths="uniform", heads=True), "needs per-block"),
    (lambda: PruneConfig(0.8, damping=0.0), "damping must be positive"),
    (lambda: PruneConfig(0.8, planning_windows=0), "at least one calibration window"),
])
def test_configs_refuse_bad_settings_when_made(make, message) -> None:
    with pytest.raises(LmsliceError, match=message):
        make()


SLICE = Slice(SliceConfig(0.25, slice_head=True))
SHARED = Slice(SliceConfig(0.25, rotation="shared"))
MEASURED = Prune(PruneConfig(0.8))
UNIFORM = Prune(PruneConfig(0.8, widths="uniform"))


@pytest.mark.parametrize("steps, message", [
    ([SLICE, SLICE], "slice: this model's residual stream is already sliced"),
    ([StandardFormat()], "one shared basis"),
    ([SLICE, StandardFormat()], "standard-format: the standard format writes a stream sliced with one shared basis"),
    ([SHARED, MEASURED, StandardFormat()], "standard-format: the standard format has one head count"),
    ([Slice(SliceConfig(0.25)), MEASURED], "prune: pruning MLP channels of a sliced model needs its head sliced"),
    ([Prune(PruneConfig(0.01))], "cannot reach 0.01"),
    ([], "no steps"),
])
def test_check_steps_refuses_what_cannot_compose_naming_the_step(steps, message) -> None:
    model = tiny_models.build("llama", torch.float32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LmsliceError, match=message):
        check_steps(model, steps)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # checks touch no weight


@pytest.mark.parametrize("steps", [[SLICE, MEASURED], [SHARED, UNIFORM, StandardFormat()], [MEASURED, SLICE],
                                   [UNIFORM, MEASURED]])
def test_check_steps_accepts_what_composes(steps) -> None:
    check_steps(tiny_models.build("llama", torch.float32), steps)


def test_compress_equals_the_passes_run_by_hand_and_records_the_recipe(tmp_path, tiny_tokenizer) -> None:
    batches = tiny_models.random_batches()
    model = tiny_models.build("llama", torch.float64)
    by_hand = copy.deepcopy(model)
    slice_model(by_hand, batches, 0.25, slice_head=True, progress=False)
    prune_to_budget(by_hand, batches, 0.8, progress=False, parameters_dense=lmslice.count_parameters(model))

    result = compress(model, batches, [SLICE, MEASURED], progress=False, calibration={"source": "random"},
                      source_model="tiny")
    ids, mask = tiny_models.padded_inputs()
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids, attention_mask=mask).logits,
                                   by_hand(ids, attention_mask=mask).logits, rtol=0, atol=1e-12)
    layout = layout_of(result.model.config)
    assert [step["step"] for step in layout.steps] == ["slice", "prune"]
    assert layout.steps[0]["sparsity"] == 0.25 and layout.steps[1]["target_params"] == 0.8
    assert layout.calibration == {"source": "random"} and layout.source_model == "tiny"
    assert layout.mlp_widths is not None and layout.stream.width == 48

    out = tmp_path / "out"
    lmslice.save_sliced(result.model.float(), tiny_tokenizer, out)
    assert [step["step"] for step in layout_of(lmslice.load(out).config).steps] == ["slice", "prune"]


def test_compress_standard_format_builds_the_familys_own_model() -> None:
    model = tiny_models.build("llama", torch.float64)
    result = compress(model, tiny_models.random_batches(), [SHARED, StandardFormat(StandardFormatConfig(False))],
                      progress=False)
    assert type(result.model).__name__ == "LlamaForCausalLM" and result.model.config.hidden_size == 48
    assert layout_of(result.model.config).standard


def test_walk_removes_its_hooks_whatever_happens() -> None:
    layer = nn.Linear(2, 2)
    seen = []

    def stop_on_second(module, args, kwargs, item) -> None:
        seen.append(item)
        if item == 2:
            raise StopForward

    assert walk([1, 2, 3], lambda item: layer(torch.ones(2)) * 0 + item, [(layer, stop_on_second)])[1] is None
    assert seen == [1, 2, 3]

    def fail(module, args, kwargs, item) -> None:
        raise RuntimeError("broken hook")

    with pytest.raises(RuntimeError):
        walk([1], lambda item: layer(torch.ones(2)), [(layer, fail)])
    assert not layer._forward_pre_hooks
