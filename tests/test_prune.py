"""MLP channel pruning under a real parameter budget: the budget, exactness, the refit, the output format."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmslice
import tiny_models
from conftest import corpus_text
from lmslice.adapters import ModelAdapter, find_adapter
from lmslice.adapters.llama import LLAMA
from lmslice.calibration import ActivationStore, capture_block_inputs, run_block
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.modeling import AttentionFree, get_module
from lmslice.prune import (HeadShape, channel_cost, first_windows, head_shapes, mlp_width, output_sensitivity,
                           plan_by_importance, plan_uniform, prune_block_heads, prune_block_mlp, prune_model,
                           prune_to_budget, refit)
from lmslice.prune.solvers import InputRows, damped_inverse, eliminate, eliminate_from_rows, head_costs
from lmslice.slicing import count_parameters, layout_before, slice_model


@pytest.mark.parametrize("family", ["llama", "opt", "phi3", "gpt_neox"])
@pytest.mark.parametrize("target", [0.9, 0.75])
def test_budget_is_met_within_one_rounding_step(family: str, target: float) -> None:
    model = tiny_models.build(family)
    dense = count_parameters(model)
    plan = plan_uniform(model, target, round_to=8)
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    step = 8 * sum(channel_cost(block, adapter.mlp) for block in blocks)
    prune_model(model, tiny_models.random_batches(), plan)
    assert count_parameters(model) == plan.parameters_planned
    assert target * dense - step < count_parameters(model) <= target * dense


@pytest.mark.parametrize("family", ["llama", "phi3", "opt"])
def test_per_block_widths_meet_the_budget_and_reload(family: str, tmp_path: Path) -> None:
    model = tiny_models.build(family)
    batches = tiny_models.random_batches()
    adapter = find_adapter(model)
    plan, sensitivities = plan_by_importance(model, batches, 0.8)
    assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())
    step = 8 * max(channel_cost(block, adapter.mlp) for block in get_module(model, adapter.blocks))
    assert 0.8 * plan.parameters_dense - step < plan.parameters_planned <= 0.8 * plan.parameters_dense
    prune_model(model, batches, plan, sensitivity=sensitivities[adapter.mlp.consumer])
    assert count_parameters(model) == plan.parameters_planned
    lmslice.save_sliced(model, None, tmp_path / "pruned")
    reloaded = lmslice.load(tmp_path / "pruned", dtype="float64")
    ids, mask = tiny_models.padded_inputs()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_output_sensitivity_does_not_depend_on_batching() -> None:
    model = tiny_models.build("llama")
    batches = tiny_models.random_batches()
    joined = [{key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}]
    for split, whole in zip(output_sensitivity(model, find_adapter(model), batches),
                            output_sensitivity(model, find_adapter(model), joined)):
        torch.testing.assert_close(split, whole, rtol=1e-10, atol=0)


def test_first_windows_keeps_the_batching() -> None:
    batches = tiny_models.random_batches(count=3)  # batches of 2 windows
    taken = first_windows(batches, 3)
    assert [len(batch["input_ids"]) for batch in taken] == [2, 1]
    torch.testing.assert_close(torch.cat([batch["input_ids"] for batch in taken]),
                               torch.cat([batch["input_ids"] for batch in batches])[:3], rtol=0, atol=0)
    with pytest.raises(LmsliceError, match="at least one calibration window"):
        prune_to_budget(tiny_models.build("llama"), batches, 0.8, planning_windows=0)


def test_unreachable_budget_is_refused() -> None:
    with pytest.raises(LmsliceError, match="cannot reach 0.1"):
        plan_uniform(tiny_models.build("llama"), 0.1)


@pytest.mark.parametrize("family", sorted({**tiny_models.FACTORIES, **tiny_models.MOE_FACTORIES}))
def test_full_budget_leaves_the_model_exact(family: str) -> None:
    model = tiny_models.build(family)
    reference = copy.deepcopy(model)
    prune_model(model, tiny_models.random_batches(), plan_uniform(model, 1.0))
    ids, mask = tiny_models.padded_inputs()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               reference(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "opt", "phi3"])
@pytest.mark.parametrize("criterion", ["obs", "energy", "leverage"])
def test_least_squares_refit_beats_deleting_the_same_channels(family: str, criterion: str) -> None:
    model = tiny_models.build(family)
    adapter = find_adapter(model)
    batches = tiny_models.random_batches(count=4)
    block = get_module(model, adapter.blocks)[0]
    targets = [run_block(block, stream, stream.hidden)
               for stream in capture_block_inputs(model, adapter, batches, ActivationStore())]

    def block_error(refit: bool) -> tuple[float, list[int]]:
        streams = capture_block_inputs(model, adapter, batches, ActivationStore())
        kept = prune_block_mlp(copy.deepcopy(block), adapter.mlp, streams, 40, criterion=criterion,
                               refit_consumer=refit)
        error = sum((stream.hidden - target).pow(2).sum().item() for stream, target in zip(streams, targets))
        return error, kept.tolist()

    refit_error, refit_kept = block_error(refit=True)
    deleted_error, deleted_kept = block_error(refit=False)
    assert refit_kept == deleted_kept
    assert refit_error < 0.8 * deleted_error


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("banded", [False, True])
def test_refit_is_least_squares_pulled_toward_the_kept_weights(bias: bool, banded: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Also where W's rows are refit in bands (as at 70B widths: here two rows per band, the last one
    short)."""
    if banded:
        monkeypatch.setattr("lmslice.prune.solvers.REFIT_ELEMENTS", 2 * 13)
    generator = torch.Generator().manual_seed(0)
    channels, kept = 12, torch.tensor([0, 2, 3, 7, 8, 11])
    inputs = torch.randn(200, channels, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, channels)
    if bias:  # the constant channel observe_consumer appends
        inputs = torch.cat([inputs, torch.ones(200, 1, dtype=torch.float64)], dim=1)
    weight = torch.randn(5, inputs.shape[1], generator=generator, dtype=torch.float64)
    matrix = inputs.T @ inputs
    columns = torch.cat([kept, torch.arange(channels, inputs.shape[1])])
    # λ = 0: plain least squares on the kept channels
    plain = torch.linalg.lstsq(inputs[:, columns], inputs @ weight.T).solution.T
    torch.testing.assert_close(refit(weight, matrix.clone(), kept, channels, 0.0), plain, rtol=1e-9, atol=1e-9)
    # any λ: the minimiser of ‖W'X_S − WX‖² + λ‖W'_S − W_S‖² (its gradient is zero), λ = 0.3 mean diag G[S, S]
    shift = 0.3 * matrix.diagonal()[kept].mean()
    pulled = refit(weight, matrix.clone(), kept, channels, 0.3)
    gradient = pulled @ matrix[columns][:, columns] - weight @ matrix[:, columns]
    gradient[:, :len(kept)] += shift * (pulled[:, :len(kept)] - weight[:, kept])
    assert gradient.abs().max() < 1e-9 * matrix.abs().max() * weight.abs().max()
    # λ → ∞: the kept columns as they were (deletion); the undamped bias is still refit
    deleted = refit(weight, matrix.clone(), kept, channels, 1e9)
    torch.testing.assert_close(deleted[:, :len(kept)], weight[:, kept], rtol=0, atol=1e-6)
    if not bias:
        torch.testing.assert_close(deleted, weight[:, kept], rtol=0, atol=1e-6)
    # a float32 W (what consumer_weight gives for a float32 model) is refit in float64 all the same
    rounded = weight.float()
    torch.testing.assert_close(refit(rounded, matrix.clone(), kept, channels, 0.3),
                               refit(rounded.double(), matrix.clone(), kept, channels, 0.3), rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(tiny_models.FACTORIES))
@pytest.mark.parametrize("offloaded", [False, True])
def test_carried_stream_is_the_pruned_block_s_output(family: str, offloaded: bool, tmp_path: Path) -> None:
    """The stream moves on by adding the consumer's change to the dense block's output (one pass per
    block), or where a norm or a scale comes between the consumer and the stream by running the pruned
    block again: either way it must equal running the pruned block, in every family."""
    model = tiny_models.build(family, torch.float64)
    adapter = find_adapter(model)
    batches = tiny_models.random_batches(count=2)
    store = ActivationStore(tmp_path if offloaded else None)
    streams = capture_block_inputs(model, adapter, batches, store)
    inputs = [stream.hidden.clone() for stream in streams]
    block = get_module(model, adapter.blocks)[0]
    prune_block_mlp(block, adapter.mlp, streams, mlp_width(block, adapter.mlp) // 2)
    for stream, hidden in zip(streams, inputs):
        torch.testing.assert_close(stream.hidden, run_block(block, stream, hidden), rtol=0, atol=1e-12)
    # the consumer inputs kept for the pass are gone again: only the streams remain
    kept = sorted(path.stem for path in tmp_path.iterdir()) if offloaded else sorted(store.tensors)
    assert kept == sorted(stream.name for stream in streams)


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pruned")
    dense = tiny_models.build("llama", torch.float32)
    dense.save_pretrained(root / "dense")
    tiny_tokenizer.save_pretrained(root / "dense")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text()[:60_000])
    code = main(["slice", str(root / "dense"), "--target-params", "0.8", "--mlp-widths", "uniform", "--calib",
                 str(corpus), "-o", str(root / "pruned"), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--calib-batch-size", "2", "--json"])
    assert code == 0
    return root / "dense", root / "pruned"


def test_cli_output_is_the_family_s_own_architecture(pruned_dirs: tuple[Path, Path], capsys) -> None:
    dense_dir, pruned_dir = pruned_dirs
    config = json.loads((pruned_dir / "config.json").read_text())
    assert "auto_map" not in config and not (pruned_dir / "modeling_lmslice.py").exists()
    record = config["lmslice"]["mlp_pruning"]
    assert config["intermediate_size"] == record["mlp_widths"][0] < 112
    report = json.loads((pruned_dir / "lmslice_report.json").read_text())
    assert report["mlp_widths"] == record["mlp_widths"]
    assert report["parameters_sliced"] == record["parameters_planned"] <= 0.8 * report["parameters_dense"]
    plain = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight  # still tied
    through_lmslice = lmslice.load(pruned_dir)
    ids, mask = tiny_models.padded_inputs()
    torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits,
                               through_lmslice(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_saved_output_reloads_without_lmslice(pruned_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, pruned_dir = pruned_dirs
    model = lmslice.load(pruned_dir)
    ids, _ = tiny_models.padded_inputs()
    expected = model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    # lmslice is made unimportable: plain transformers must build the model from its config alone.
    script = ("import sys, torch; sys.modules['lmslice'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained({str(pruned_dir)!r})\n"
              f"torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, "
              f"{str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_finetune_and_bench_accept_the_output(pruned_dirs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    dense_dir, pruned_dir = pruned_dirs
    corpus = pruned_dir.parent / "corpus.txt"
    out = tmp_path / "recovered"
    assert main(["finetune", str(pruned_dir), "--data", str(corpus), "-o", str(out), "--samples", "2",
                 "--seqlen", "32", "--batch-size", "2", "--lora-r", "2", "--eval-seqlen", "32",
                 "--eval-max-windows", "1", "--json"]) == 0
    assert not (out / "modeling_lmslice.py").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size < 112
    capsys.readouterr()
    assert main(["bench", str(dense_dir), str(out), "--seqlen", "16", "--max-batch", "1", "--repeats", "1",
                 "--prompt-len", "4", "--new-tokens", "2", "--threads", "1", "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["ratios"]["flops"] < 1


def test_cli_measured_widths_write_a_layout_finetune_accepts(pruned_dirs: tuple[Path, Path], tmp_path: Path,
                                                             capsys) -> None:
    dense_dir, pruned_dir = pruned_dirs
    out = tmp_path / "measured"
    assert main(["slice", str(dense_dir), "--target-params", "0.8", "--calib", str(pruned_dir.parent / "corpus.txt"),
                 "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2"]) == 0
    assert "by block" in capsys.readouterr().out
    layout = json.loads((out / "config.json").read_text())["lmslice"]
    model = lmslice.load(out)
    assert [get_module(block, "mlp.down_proj").in_features for block in model.model.layers] == layout["mlp_widths"]
    assert count_parameters(model) == layout["mlp_pruning"]["parameters_planned"]
    recovered = tmp_path / "recovered"
    assert main(["finetune", str(out), "--data", str(pruned_dir.parent / "corpus.txt"), "-o", str(recovered),
                 "--samples", "2", "--seqlen", "32", "--batch-size", "2", "--lora-r", "2", "--eval-seqlen", "32",
                 "--eval-max-windows", "1", "--json"]) == 0
    assert json.loads((recovered / "config.json").read_text())["lmslice"]["mlp_widths"] == layout["mlp_widths"]
    assert count_parameters(lmslice.load(recovered)) == count_parameters(model)


def test_sparsity_and_target_params_slice_then_prune(pruned_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    dense_dir, _ = pruned_dirs
    corpus = dense_dir.parent / "corpus.txt"
    out = tmp_path / "both"
    assert main(["slice", str(dense_dir), "--sparsity", "0.25", "--target-params", "0.7", "--calib", str(corpus),
                 "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2",
                 "--json"]) == 0
    record = json.loads((out / "config.json").read_text())["lmslice"]
    assert record["width"] == 48 and len(set(record["mlp_widths"])) > 1  # sliced, then per-block MLP widths
    dense = count_parameters(AutoModelForCausalLM.from_pretrained(dense_dir))
    model = lmslice.load(out)
    step = 8 * max(channel_cost(block, LLAMA.mlp) for block in get_module(model, LLAMA.blocks))
    assert count_parameters(model) == record["mlp_pruning"]["parameters_planned"]
    assert 0.7 * dense - step < count_parameters(model) <= 0.7 * dense


@pytest.mark.parametrize("family", ["llama", "opt", "phi"])
def test_carried_stream_is_exact_in_a_sliced_model(family: str) -> None:
    """In a sliced model the consumers also add the shortcut; the stream is still carried exactly (heads
    pruned first where the family's are known)."""
    model = tiny_models.build(family, torch.float64)
    batches = tiny_models.random_batches(count=2)
    slice_model(model, batches, 0.25, slice_head=True, progress=False)
    adapter = find_adapter(model)
    streams = capture_block_inputs(model, adapter, batches, ActivationStore())
    for index, block in enumerate(get_module(model, adapter.blocks)):
        enter(streams, index)
        inputs = [stream.hidden.clone() for stream in streams]
        if adapter.attention is not None:
            shape = HeadShape.of(block, adapter.attention)
            prune_block_heads(block, adapter.attention, streams, shape.heads_after(1))
        prune_block_mlp(block, adapter.mlp, streams, mlp_width(block, adapter.mlp) - 16)
        for stream, hidden in zip(streams, inputs):
            torch.testing.assert_close(stream.hidden, run_block(block, stream, hidden), rtol=0, atol=1e-12)


def test_a_sliced_model_whose_head_reads_more_is_refused() -> None:
    model = tiny_models.build("llama")
    batches = tiny_models.random_batches(count=2)
    slice_model(model, batches, 0.25, progress=False)
    with pytest.raises(LmsliceError, match="slice_head"):
        prune_to_budget(model, batches, 0.7)


@pytest.mark.parametrize("family", sorted(tiny_models.FACTORIES))
def test_head_pruning_carries_the_stream_exactly_and_reloads(family: str, tmp_path: Path) -> None:
    """Query heads leave along the path (one per key/value group, then whole groups; the output
    projection refit), a different number of steps in each block, then the MLP is pruned: the carried
    stream is what the pruned block computes, the key/value heads of the groups left are the dense
    block's, and the saved model reloads identically."""
    model, adapter, streams = pruning_start(family)
    attention, blocks = adapter.attention, get_module(model, adapter.blocks)
    dense_blocks = get_module(tiny_models.build(family, torch.float64), adapter.blocks)
    heads = []
    for index, (block, dense_block) in enumerate(zip(blocks, dense_blocks)):
        enter(streams, index)
        shape = HeadShape.of(block, attention)
        assert shape.steps == shape.per_group - 1 + shape.groups - 1  # every family here can drop whole groups
        inputs = [stream.hidden.clone() for stream in streams]
        heads.append(shape.heads_after([1, shape.steps, shape.steps - 1][index]))
        kept = prune_block_heads(block, attention, streams, heads[-1])
        after = HeadShape.of(block, attention)
        assert len(kept) == after.heads == heads[-1] and after.groups == min(heads[-1], shape.groups)
        groups = shape.columns(sorted({head // shape.per_group for head in kept}), torch.device("cpu"))
        if attention.keys is not None and after.groups < shape.groups:
            keys = get_module(dense_block, attention.keys).weight[groups]
            assert torch.equal(get_module(block, attention.keys).weight, keys)
        if attention.stacked:  # the key rows follow the query heads' in the one projection
            width = shape.heads * shape.head_dim
            keys = get_module(dense_block, attention.queries).weight[width + groups]
            kept_width = after.heads * shape.head_dim
            assert torch.equal(get_module(block, attention.queries).weight[kept_width:kept_width + len(groups)], keys)
        prune_block_mlp(block, adapter.mlp, streams, mlp_width(block, adapter.mlp) - 16)
        for stream, hidden in zip(streams, inputs):
            torch.testing.assert_close(stream.hidden, run_block(block, stream, hidden), rtol=0, atol=1e-12)
    reloaded = saved_and_reloaded(model, adapter, heads, tmp_path)
    ids, mask = tiny_models.padded_inputs()
    logits = reloaded(input_ids=ids, attention_mask=mask).logits
    dense = tiny_models.build(family, torch.float64)
    assert (logits - dense(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3  # really pruned


def enter(streams: list, index: int) -> None:
    """The streams now enter block `index` (its own attention mask and position embeddings)."""
    for stream in streams:
        stream.at = index


def pruning_start(family: str) -> tuple[torch.nn.Module, ModelAdapter, list]:
    """A tiny float64 model of `family`, its adapter and its first block's calibration stream."""
    model = tiny_models.build(family, torch.float64)
    adapter = find_adapter(model)
    return model, adapter, capture_block_inputs(model, adapter, tiny_models.random_batches(count=2), ActivationStore())


def saved_and_reloaded(model: torch.nn.Module, adapter: ModelAdapter, heads: list[int],
                       tmp_path: Path) -> torch.nn.Module:
    """`model`, pruned by hand to `heads` and its current MLP widths, saved and loaded back: its logits
    are checked to be the same."""
    widths = tuple(mlp_width(block, adapter.mlp) for block in get_module(model, adapter.blocks))
    model.config.lmslice = layout_before(model, adapter).replace(mlp_widths=widths,
                                                                 attention_heads=tuple(heads)).to_json()
    lmslice.save_sliced(model, None, tmp_path / "pruned")
    reloaded = lmslice.load(tmp_path / "pruned", dtype="float64")
    ids, mask = tiny_models.padded_inputs()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    return reloaded


@pytest.mark.parametrize("family", ["llama", "opt", "phi", "phi3", "gpt_neox", "gemma2", "granite", "olmo2"])
def test_a_block_loses_its_whole_attention_exactly_and_reloads(family: str, tmp_path: Path) -> None:
    """Block 1's heads all leave (its attention becomes `AttentionFree`, with a refit bias where the
    output projection had one), the others' one step: the carried stream is what the pruned blocks compute, the saved
    model reloads identically, and greedy decoding through the cache matches recomputing every step."""
    model, adapter, streams = pruning_start(family)
    attention, blocks = adapter.attention, get_module(model, adapter.blocks)
    heads = []
    for index, block in enumerate(blocks):
        enter(streams, index)
        shape = HeadShape.of(block, attention, removable=index > 0)
        heads.append(0 if index == 1 else shape.heads_after(1))
        inputs = [stream.hidden.clone() for stream in streams]
        prune_block_heads(block, attention, streams, heads[-1], removable=index > 0)
        prune_block_mlp(block, adapter.mlp, streams, mlp_width(block, adapter.mlp) - 16)
        for stream, hidden in zip(streams, inputs):
            torch.testing.assert_close(stream.hidden, run_block(block, stream, hidden), rtol=0, atol=1e-12)
    free = get_module(blocks[1], attention.module)
    dense_output = get_module(get_module(tiny_models.build(family), adapter.blocks)[1], attention.output)
    assert isinstance(free, AttentionFree) and (free.bias is not None) == (dense_output.bias is not None)
    assert HeadShape.of(blocks[1], attention).steps == 0  # nothing left for a later plan to cut
    assert_cached_decoding_is_recomputing(saved_and_reloaded(model, adapter, heads, tmp_path))


@pytest.mark.parametrize("family", ["llama", "opt", "phi", "gpt_neox", "phi3", "gemma", "gemma3", "granite", "olmo2"])
def test_blocks_lose_their_whole_mlp_and_whole_block_exactly_and_reload(family: str, tmp_path: Path) -> None:
    """Block 1 loses its MLP (what it writes is its consumer's bias, refit to the MLP's mean output, where
    it has one), block 2 its MLP and its attention: a block that writes nothing, the identity where no
    bias is left. The carried stream is what the pruned blocks compute, the saved model reloads
    identically, and greedy decoding through the cache matches recomputing every step."""
    model, adapter, streams = pruning_start(family)
    blocks, attention = get_module(model, adapter.blocks), adapter.attention
    heads = [HeadShape.of(block, attention).heads for block in blocks[:2]] + [0]
    for index, block in enumerate(blocks):
        enter(streams, index)
        inputs = [stream.hidden.clone() for stream in streams]
        if index == 2:
            prune_block_heads(block, attention, streams, 0, removable=True)
        prune_block_mlp(block, adapter.mlp, streams, 0 if index else mlp_width(block, adapter.mlp) - 16)
        for stream, hidden in zip(streams, inputs):
            torch.testing.assert_close(stream.hidden, run_block(block, stream, hidden), rtol=0, atol=1e-12)
            if index == 2 and get_module(block, adapter.mlp.consumer).bias is None \
                    and get_module(block, attention.module).bias is None:
                torch.testing.assert_close(run_block(block, stream, hidden), hidden, rtol=0, atol=0)  # the identity
    assert [mlp_width(block, adapter.mlp) for block in blocks] == [112 - 16, 0, 0]
    assert_cached_decoding_is_recomputing(saved_and_reloaded(model, adapter, heads, tmp_path))


def assert_cached_decoding_is_recomputing(model: torch.nn.Module) -> None:
    """Greedy decoding through transformers' cache gives what recomputing every step gives."""
    ids, mask = tiny_models.padded_inputs()

    def greedy(use_cache: bool):
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              use_cache=use_cache, pad_token_id=0, output_logits=True, return_dict_in_generate=True)

    cached, recomputed = greedy(True), greedy(False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert max((a - b).abs().max() for a, b in zip(cached.logits, recomputed.logits)) <= 1e-10


def test_the_plan_takes_a_whole_mlp_where_it_costs_least() -> None:
    """Block 1's MLP scaled to almost nothing: a budget that needs its every parameter takes all of it
    (the path's last step, 8 channels to none) and leaves the others whole."""
    model = tiny_models.build("llama")
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    blocks[1].mlp.down_proj.weight.data *= 1e-4
    dense = count_parameters(model)
    mlp_parameters = 112 * channel_cost(blocks[1], adapter.mlp)
    result = prune_to_budget(model, tiny_models.random_batches(), (dense - mlp_parameters) / dense, heads=False,
                             progress=False)
    assert result.plan.mlp_widths == [112, 0, 112]
    assert mlp_width(blocks[1], adapter.mlp) == 0 and result.plan.parameters_planned == dense - mlp_parameters


def test_slice_deletes_a_nearly_silent_mlp_whole_and_says_so(tiny_tokenizer, text_file: Path, tmp_path: Path,
                                                             capsys) -> None:
    """Through the CLI, on text: block 1's MLP scaled to almost nothing is deleted whole by a budget that
    needs its parameters, the summary names the block, and the output reloads with it."""
    model = tiny_models.build("llama", torch.float32)
    model.model.layers[1].mlp.down_proj.weight.data *= 1e-4
    dense = count_parameters(model)
    budget = (dense - 112 * channel_cost(model.model.layers[1], LLAMA.mlp) + 100) / dense  # printed to 6 digits
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    out = tmp_path / "pruned"
    assert main(["slice", str(tmp_path / "dense"), "--target-params", f"{budget:.6f}", "--no-prune-heads",
                 "--calib", str(text_file), "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--calib-batch-size", "2"]) == 0
    assert "no MLP         block 1 (deleted whole)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["lmslice"]["mlp_widths"] == [112, 0, 112]
    pruned = lmslice.load(out)
    assert pruned.model.layers[1].mlp.down_proj.weight.shape == (64, 0)
    ids, mask = tiny_models.padded_inputs()
    assert torch.isfinite(pruned(input_ids=ids, attention_mask=mask).logits).all()


def test_the_plan_takes_whole_attentions_where_they_cost_least_but_never_the_first() -> None:
    """With the value projections scaled down every head is nearly free: a budget that needs all but
    2000 of the parameters the heads can give takes every step of every path, which leaves block 0
    one head (the cache counts tokens there) and deletes the attention of the others."""
    model = tiny_models.build("llama")
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    for block in blocks:
        block.self_attn.v_proj.weight.data *= 1e-4
    heads_parameters = sum(sum(HeadShape.of(block, adapter.attention, index > 0).step_costs(block, adapter.attention))
                           for index, block in enumerate(blocks))
    dense = count_parameters(model)
    result = prune_to_budget(model, tiny_models.random_batches(), (dense - heads_parameters + 2000) / dense,
                             heads=True, progress=False)
    assert result.plan.attention_heads == [1, 0, 0] and result.plan.mlp_widths == [112] * 3
    assert count_parameters(model) == dense - heads_parameters
    ids, mask = tiny_models.padded_inputs()
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
    again = prune_to_budget(model, tiny_models.random_batches(), 0.6, parameters_dense=dense, progress=False)
    assert again.plan.attention_heads == [1, 0, 0] and count_parameters(model) <= 0.6 * dense  # MLPs only now
    with pytest.raises(LmsliceError, match="^a block of this model has no attention left"):
        lmslice.check_steps(model, [lmslice.Slice(lmslice.SliceConfig(0.25))])


def test_heads_compete_for_the_budget() -> None:
    """Scaled-down value projections make every head nearly free to remove: the plan takes them first."""
    model = tiny_models.build("llama")
    adapter = find_adapter(model)
    for block in get_module(model, adapter.blocks):
        get_module(block, "self_attn.v_proj").weight.data *= 1e-4
    batches = tiny_models.random_batches()
    dense_shape = HeadShape.of(get_module(model, adapter.blocks)[0], adapter.attention)
    result = prune_to_budget(model, batches, 0.9, heads=True, progress=False)
    heads = result.plan.attention_heads
    # 4 heads in 2 groups: a step (two query heads, or a whole group of one) is 4096 parameters, 10% is three
    assert result.plan.mlp_widths == [112] * 3 and sum(dense_shape.steps_to(count) for count in heads) == 3
    assert count_parameters(model) == result.plan.parameters_planned <= 0.9 * result.plan.parameters_dense
    assert model.config.lmslice["attention_heads"] == heads


def test_head_pruning_is_refused_where_it_cannot_apply() -> None:
    batches = tiny_models.random_batches()
    with pytest.raises(LmsliceError, match="measured mlp_widths"):
        prune_to_budget(tiny_models.build("llama"), batches, 0.8, widths="uniform", heads=True)


def test_whole_key_value_groups_leave_a_multi_head_model_and_the_summary_says_so(tiny_tokenizer, text_file: Path,
                                                                                  tmp_path: Path, capsys) -> None:
    """OPT is multi-head (every head its own group): its heads leave whole, key and value rows with them,
    down to none but in block 0. Scaled-down value projections make them nearly free, so a budget that
    needs all but 2000 of the parameters the heads can give takes every head the paths allow."""
    model = tiny_models.build("opt", torch.float32)
    adapter = find_adapter(model)
    blocks = get_module(model, adapter.blocks)
    for block in blocks:
        block.self_attn.v_proj.weight.data *= 1e-4
    dense = count_parameters(model)
    budget = (dense - sum(sum(shape.step_costs(block, adapter.attention))
                          for block, shape in zip(blocks, head_shapes(model, adapter))) + 2000) / dense
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    out = tmp_path / "pruned"
    assert main(["slice", str(tmp_path / "dense"), "--target-params", f"{budget:.6f}", "--calib", str(text_file),
                 "-o", str(out), "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "query heads    0-1 by block, 0 on average (output projection refit)" in printed
    assert "key/value heads 0-1 by block, 0 on average (whole groups removed)" in printed
    assert "no attention   blocks 1, 2 (deleted whole)" in printed
    pruned = lmslice.load(out)
    record = json.loads((out / "config.json").read_text())["lmslice"]
    assert record["attention_heads"] == [1, 0, 0] and record["mlp_widths"] == [112] * 3
    assert pruned.model.decoder.layers[0].self_attn.k_proj.out_features == 16
    assert pruned.model.decoder.layers[0].self_attn.num_heads == 1
    assert all(isinstance(block.self_attn, AttentionFree) for block in pruned.model.decoder.layers[1:])
    ids, mask = tiny_models.padded_inputs()
    assert torch.isfinite(pruned(input_ids=ids, attention_mask=mask).logits).all()


def test_cli_refuses_heads_without_measured_widths(capsys, tmp_path: Path) -> None:
    assert main(["slice", "m", "--target-params", "0.8", "--mlp-widths", "uniform", "--prune-heads", "--calib",
                 "pydoc", "-o", str(tmp_path / "out")]) == 2
    assert "--prune-heads spends a --keep budget on per-block widths" in capsys.readouterr().err


def test_reported_time_includes_the_plan(monkeypatch) -> None:
    model = tiny_models.build("llama")
    clock = iter(range(0, 1000, 10))
    # only this module's clock: the walk's progress reads time.perf_counter too
    monkeypatch.setattr("lmslice.prune.passes.time", SimpleNamespace(perf_counter=lambda: next(clock)))
    result = prune_to_budget(model, tiny_models.random_batches(), 0.8, progress=False)
    assert result.seconds == 30  # the budget's start, prune_model's start and end, the budget's end


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_damped_inverse_is_the_inverse_of_the_damped_gram(dtype: torch.dtype, tolerance: float) -> None:
    """(G + λI)⁻¹ from the Cholesky factor equals the float64 inverse, λ only on the channels (not the
    constant channel of a bias), for a rank-deficient G like a few calibration tokens give."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(24, 41, generator=generator, dtype=torch.float64)
    rows[:, -1] = 1.0  # the constant channel
    gram = rows.T @ rows
    damped = gram.clone()
    damped.diagonal()[:40] += 0.1 * gram.diagonal()[:40].mean()
    expected = torch.linalg.inv(damped)
    inverse = damped_inverse(gram, 40, 0.1, dtype)
    assert inverse.dtype == dtype
    assert (inverse.double() - expected).abs().max() / expected.abs().max() < tolerance


def test_head_costs_are_each_heads_own_removal_cost() -> None:
    """The batched costs equal tr(W_h ((G⁻¹)_hh)⁻¹ W_hᵀ) head by head, removed heads left out."""
    generator = torch.Generator().manual_seed(1)
    shape = HeadShape(heads=6, head_dim=4, groups=2)
    rows = torch.randn(64, 25, generator=generator, dtype=torch.float64)  # a bias's constant channel last
    inverse = torch.linalg.inv(rows.T @ rows + torch.eye(25, dtype=torch.float64))
    weight = torch.randn(10, 25, generator=generator, dtype=torch.float64)
    alive = [0, 2, 3, 5]
    costs = head_costs(weight, inverse, shape, alive)
    for cost, head in zip(costs, alive):
        columns = torch.arange(head * 4, head * 4 + 4)
        own = torch.trace(weight[:, columns] @ torch.linalg.inv(inverse[columns][:, columns]) @ weight[:, columns].T)
        assert cost.item() == pytest.approx(own.item(), rel=1e-10)


@pytest.mark.parametrize("remove, step", [(30, 7), (40, 40), (12, 1)])
def test_elimination_is_greedy_least_squares_removal(remove: int, step: int) -> None:
    """Each step of `eliminate` removes the channels cheapest by ‖W'_j‖² / ((G_S + λI)⁻¹)_jj, W' the
    consumer refit on the channels S left, and its errors are the least-squares errors of fitting W's
    output on the channels left (tr ΔW (G + λI) ΔWᵀ): against a reference that refits from scratch at
    every step. The constant channel of a bias (last) is never removed."""
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(24, 41, generator=generator, dtype=torch.float64) * torch.rand(41, generator=generator,
                                                                                      dtype=torch.float64)
    rows[:, -1] = 1.0
    gram = rows.T @ rows
    weight = torch.randn(9, 41, generator=generator, dtype=torch.float64)
    damped = gram.clone()
    damped.diagonal()[:40] += 0.1 * gram.diagonal()[:40].mean()

    alive, errors, left = torch.arange(41), [], remove
    while left:
        inverse = torch.linalg.inv(damped[alive][:, alive])
        refit_weight = weight @ damped[:, alive] @ inverse
        costs = refit_weight.pow(2).sum(0) / inverse.diagonal()
        costs[alive == 40] = float("inf")
        removed = torch.topk(costs, min(step, left), largest=False).indices
        alive = alive[~torch.isin(torch.arange(len(alive)), removed)]
        change = weight.clone()
        change[:, alive] -= weight @ damped[:, alive] @ torch.linalg.inv(damped[alive][:, alive])
        errors.append(torch.trace(change @ damped @ change.T).item())
        left -= len(removed)

    kept, measured = eliminate(weight, damped_inverse(gram, 40, 0.1, torch.float64), 40, remove, step)
    assert torch.equal(kept, alive[alive < 40])
    assert measured == pytest.approx(errors, rel=1e-9)


def test_eliminating_from_the_inputs_equals_eliminating_from_their_gram() -> None:
    """With fewer tokens than channels, `eliminate_from_rows` (never forming G) removes the same channels
    with the same errors as `eliminate` on G = XᵀX, to float64 rounding, whole path included."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(20, 90, generator=generator, dtype=torch.float64) * 3 * torch.rand(90, generator=generator,
                                                                                          dtype=torch.float64)
    weight = torch.randn(12, 90, generator=generator, dtype=torch.float64)
    for remove, step in [(90, 8), (41, 5)]:
        expected = eliminate(weight, damped_inverse(rows.T @ rows, 90, 0.1, torch.float64), 90, remove, step)[1]
        assert eliminate_from_rows(weight, InputRows(rows), remove, step, 0.1) == pytest.approx(expected, rel=1e-9)


def test_a_plan_on_few_tokens_keeps_the_inputs_and_equals_the_plan_from_grams(monkeypatch) -> None:
    """The plan's Fisher walk keeps the MLP consumer's inputs when there are at most a quarter as many
    tokens as channels (two batches of 12 tokens, 112 channels); every MLP path and the plan equal the ones measured
    from the Gram matrices (float64 eliminations; relative 1e-6, the rounding of G's float32 products)."""
    monkeypatch.setattr("lmslice.prune.plan.ELIMINATION_DTYPE", torch.float64)
    monkeypatch.setattr("lmslice.prune.solvers.ELIMINATION_DTYPE", torch.float64)
    paths: dict[str, list[list[float]]] = {"rows": [], "grams": []}
    measured = lmslice.prune.plan.mlp_path
    sensitivity = lmslice.prune.plan.consumer_sensitivity

    def plan(kind: str):
        def recorded(weight, gram, *args, **kwargs):
            assert isinstance(gram, InputRows) == (kind == "rows")
            path = measured(weight, gram, *args, **kwargs)
            paths[kind].append(path.errors)
            return path

        def measure(*args, **kwargs):
            return sensitivity(*args, **{**kwargs, "rows": kwargs["rows"] if kind == "rows" else ()})

        monkeypatch.setattr("lmslice.prune.plan.mlp_path", recorded)
        monkeypatch.setattr("lmslice.prune.plan.consumer_sensitivity", measure)
        return plan_by_importance(tiny_models.build("llama"), tiny_models.random_batches(2, 1, 12), 0.7, heads=True)[0]

    from_rows, from_grams = plan("rows"), plan("grams")
    assert len(paths["rows"]) == 3
    for errors, expected in zip(paths["rows"], paths["grams"]):
        assert errors == pytest.approx(expected, rel=1e-6)
    assert (from_rows.mlp_widths, from_rows.attention_heads) == (from_grams.mlp_widths, from_grams.attention_heads)
