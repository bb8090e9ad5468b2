"""`lmslice bench`: the report's structure, and FLOP counts checked against a count by hand.

Timings on a shared CPU say nothing reliable, so only their presence and sign are checked.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import lmslice
import tiny_models
from lmslice.bench import benchmark, count_flops
from lmslice.cli import build_parser, main
from lmslice.adapters import find_adapter
from lmslice.slicing import layout_before, slice_model

SEQLEN = 16
TINY = dict(seqlen=SEQLEN, max_batch=2, repeats=1, warmup=1, prompt_len=4, new_tokens=2)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_models.build("llama", torch.float32)
    sliced = copy.deepcopy(dense)
    slice_model(sliced, tiny_models.random_batches(), 0.25, progress=False)
    return dense, sliced


def expected_llama_flops(config, width: int, head_width: int, context: float) -> tuple[int, int, float]:
    """(linear, shortcut, attention) FLOPs per token of a Llama sliced to `width`, from its config."""
    hidden, inter, layers, vocab = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                                    config.vocab_size)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = width * q + 2 * width * kv + q * width + 2 * width * inter  # q, k, v, o, gate, up
    down = (layers - 1) * inter * width + inter * head_width  # the last block writes the head's width
    linear = 2 * (layers * per_layer + down + head_width * vocab)
    shortcut = 0
    if width != hidden:  # one D'xD' per residual connection; the last one widens to the head's width
        shortcut = 2 * ((2 * layers - 1) * width * width + width * head_width)
    attention = 4.0 * layers * heads * head_dim * context
    return linear, shortcut, attention


def test_flop_counts_match_a_count_by_hand(models) -> None:
    dense, sliced = models
    layout = sliced.config.lmslice
    assert (layout["width"], layout["head_width"]) == (48, 64)
    for model, width in ((dense, 64), (sliced, 48)):
        counted = count_flops(model, SEQLEN)
        linear, shortcut, attention = expected_llama_flops(dense.config, width, 64, SEQLEN)
        assert (counted.linear, counted.shortcut, counted.attention) == (linear, shortcut, attention)
        assert counted.total == linear + shortcut + attention
    assert count_flops(sliced, SEQLEN).total < count_flops(dense, SEQLEN).total


def test_benchmark_reports_every_measurement(models) -> None:
    dense, sliced = models
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        report = benchmark(dense, sliced, threads=1, **TINY)
        assert torch.get_num_threads() == 3  # the run's thread count is restored afterwards
    finally:
        torch.set_num_threads(previous)
    result = report.as_dict()
    assert set(result) == {"settings", "models", "dense", "sliced", "ratios"}
    assert result["settings"]["threads"] == 1 and result["settings"]["seqlen"] == SEQLEN
    for name in ("dense", "sliced"):
        model = result[name]
        assert set(model) == {"parameters", "flops_per_token", "throughput", "latency"}
        throughput, latency = model["throughput"], model["latency"]
        assert throughput["tokens_per_s"] > 0 and throughput["batch_size"] in (1, 2)
        assert set(throughput["by_batch"]) <= {"1", "2"} and throughput["stopped"]
        assert latency["ms_per_token"] > 0 and latency["prefill_ms"] > 0
        assert latency["new_tokens"] == 2 and len(latency["runs_ms_per_token"]) == 1
        assert model["flops_per_token"]["forward"]["total"] > model["flops_per_token"]["decode"]["total"] > 0

    ratios = result["ratios"]
    linear, shortcut, attention = expected_llama_flops(dense.config, 48, 64, SEQLEN)
    dense_linear, _, _ = expected_llama_flops(dense.config, 64, 64, SEQLEN)
    assert ratios["flops"] == pytest.approx((linear + shortcut + attention) / (dense_linear + attention))
    assert ratios["flops"] < 1 and ratios["flops_decode"] < 1
    assert ratios["theoretical_speedup"] == pytest.approx(1 / ratios["flops"])
    for key in ("throughput", "latency", "throughput_share", "latency_share", "latency_speedup"):
        assert ratios[key] > 0 and math.isfinite(ratios[key])
    table = report.table()
    assert "throughput" in table and "ms/token" in table and "FLOP" in table


def test_decode_matches_a_full_forward(models) -> None:
    """The timed decode loop really uses the KV cache: its tokens are the greedy continuation."""
    from lmslice.bench import _cache_argument, _output_cache

    _, sliced = models
    prompt = torch.randint(0, tiny_models.VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        output = sliced(input_ids=prompt, use_cache=True)
        token = output.logits[:, -1:].argmax(-1)
        step = sliced(input_ids=token, use_cache=True, **{_cache_argument(sliced): _output_cache(output)})
        full = sliced(input_ids=torch.cat([prompt, token], dim=1)).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_cli_bench_json(models, tiny_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, sliced = models
    dense.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    lmslice.save_sliced(sliced, tiny_tokenizer, tmp_path / "sliced")
    threads = torch.get_num_threads()
    code = main(["bench", str(tmp_path / "dense"), str(tmp_path / "sliced"), "--seqlen", str(SEQLEN),
                 "--max-batch", "1", "--repeats", "1", "--prompt-len", "4", "--new-tokens", "2", "--threads",
                 str(threads + 1), "--json"])
    assert code == 0
    assert torch.get_num_threads() == threads
    result = json.loads(capsys.readouterr().out)
    assert result["models"] == {"dense": str(tmp_path / "dense"), "sliced": str(tmp_path / "sliced")}
    assert result["dense"]["throughput"]["by_batch"].keys() == {"1"}
    assert all("--max-batch 1" in result[name]["throughput"]["stopped"] for name in ("dense", "sliced"))
    assert 0 < result["ratios"]["flops"] < 1


def test_cli_bench_rejects_cuda_without_a_gpu(models, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_bench_help_lists_every_option() -> None:
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    help_text = subparsers.choices["bench"].format_help()
    for option in ("--seqlen", "--device", "--dtype", "--max-batch", "--repeats", "--new-tokens", "--prompt-len",
                   "--threads", "--warmup", "--json"):
        assert option in help_text


def test_pruned_query_heads_count_as_they_are() -> None:
    model = tiny_models.build("llama")  # 3 layers of 4 heads of 16
    dense = count_flops(model, context=100).attention
    model.config.lmslice = layout_before(model, find_adapter(model)).replace(attention_heads=(2, 4, 2)).to_json()
    assert dense == 4 * 3 * 4 * 16 * 100
    assert count_flops(model, context=100).attention == dense * 8 / 12
