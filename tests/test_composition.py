"""Composition by rule: every lmslice output takes every further step that makes sense and the result
loads; a step that does not make sense is refused in one line before the calibration text is read.

The matrix runs the CLI on a tiny Llama, as a user would; the family test runs the library's passes
after a reload for every family, comparing the reloaded result with the in-memory one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmslice
import tiny_models
from lmslice.adapters import find_adapter
from lmslice.cli import main
from lmslice.prune import prune_to_budget
from lmslice.slicing import slice_model
from test_adapters import REPRESENTATIVES

CALIBRATION = ("--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch-size", "2")
# What each output kind is made with (from the dense model), and what each step is.
KINDS = {
    "sliced": ("--sparsity", "0.25"),
    "sliced-head": ("--sparsity", "0.25", "--slice-head"),
    "standard": ("--sparsity", "0.25", "--format", "standard"),
    "uniform": ("--target-params", "0.8", "--mlp-widths", "uniform"),
    "measured": ("--target-params", "0.8"),
    "offloaded": ("--sparsity", "0.25", "--offload"),
}
STEPS = {
    "slice": ("--sparsity", "0.25"),
    "offload": ("--sparsity", "0.25", "--offload"),
    "standard": ("--sparsity", "0.25", "--format", "standard"),
    "prune-uniform": ("--target-params", "0.8", "--mlp-widths", "uniform"),
    "prune-measured": ("--target-params", "0.8"),
}
ALREADY_SLICED = "residual stream is already sliced"
HEAD = "needs its head sliced too"
# (kind, step) -> the refusal's words; every pair not listed works and loads.
REFUSED = {
    **{(kind, step): ALREADY_SLICED for kind in ("sliced", "sliced-head", "offloaded")
       for step in ("slice", "offload", "standard")},
    ("sliced", "prune-uniform"): HEAD, ("sliced", "prune-measured"): HEAD,
    ("offloaded", "prune-uniform"): HEAD, ("offloaded", "prune-measured"): HEAD,
    ("measured", "standard"): "query heads were pruned per block",
    ("measured", "prune-uniform"): "uniform pruning needs equal widths",
}


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    code = main([str(arg) for arg in args])
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("lmslice: error: ")]
    return code, errors[-1] if errors else ""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, dense_dir: Path) -> dict[str, Path]:
    """Every output kind, made once from the tiny dense Llama."""
    root = tmp_path_factory.mktemp("kinds")
    text = root / "corpus.txt"
    from conftest import corpus_text

    text.write_text(corpus_text()[:60_000])
    made = {"dense": dense_dir}
    for kind, options in KINDS.items():
        out = root / kind
        assert main(["slice", str(dense_dir), *options, "--calib", str(text), "-o", str(out), *CALIBRATION,
                     "--json"]) == 0, kind
        made[kind] = out
    return made


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("kind", ["dense", *sorted(KINDS)])
def test_every_step_after_every_output_works_and_loads_or_is_refused_in_one_line(
        kind: str, step: str, outputs: dict[str, Path], text_file: Path, tmp_path: Path, capsys,
        monkeypatch) -> None:
    out = tmp_path / "next"
    refusal = REFUSED.get((kind, step))
    if refusal:
        monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)  # refused before it
    code, error = run_cli(capsys, "slice", outputs[kind], *STEPS[step], "--calib", text_file, "-o", out,
                          *CALIBRATION, "--json")
    if refusal:
        assert code == 2 and refusal in error and not out.exists()
        return
    assert code == 0, error
    model = lmslice.load(out)
    ids, mask = tiny_models.padded_inputs()
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    config = json.loads((out / "config.json").read_text())
    remote = "auto_map" in config
    assert remote == (out / "modeling_lmslice.py").is_file() == (out / "lmslice_layout.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, logits, rtol=1e-5, atol=1e-5)


def reload_and_compare(model: torch.nn.Module, out: Path) -> torch.nn.Module:
    lmslice.save_sliced(model, None, out)
    reloaded = lmslice.load(out, dtype="float64")
    ids, mask = tiny_models.padded_inputs()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=1e-9, atol=1e-9)
    return reloaded


@pytest.mark.parametrize("family", REPRESENTATIVES)
def test_reloaded_outputs_of_every_family_can_be_cut_again(family: str, tmp_path: Path) -> None:
    """Pruned then reloaded then sliced, and sliced (head too) then reloaded then pruned: each result
    reloads to the same logits (the adapter comes from the record, not the renamed class). A family whose
    blocks cannot be sliced is pruned again instead."""
    batches = tiny_models.random_batches()
    pruned = tiny_models.build(family)
    prune_to_budget(pruned, batches, 0.85, progress=False)
    reloaded = reload_and_compare(pruned, tmp_path / "pruned")
    if find_adapter(reloaded).cannot_slice():
        prune_to_budget(reloaded, batches, 0.7, progress=False)
        reload_and_compare(reloaded, tmp_path / "pruned-pruned")
        return
    slice_model(reloaded, batches, 0.25, progress=False)
    reload_and_compare(reloaded, tmp_path / "pruned-sliced")

    sliced = tiny_models.build(family)
    slice_model(sliced, batches, 0.25, slice_head=True, progress=False)
    reloaded = reload_and_compare(sliced, tmp_path / "sliced")
    prune_to_budget(reloaded, batches, 0.85, progress=False)
    reload_and_compare(reloaded, tmp_path / "sliced-pruned")


def test_remote_code_loads_a_pruned_then_sliced_output_without_lmslice(tmp_path: Path) -> None:
    """The modeling file imports the layout module copied beside it, not lmslice."""
    import subprocess
    import sys

    model = tiny_models.build("llama", torch.float32)
    prune_to_budget(model, tiny_models.random_batches(), 0.8, progress=False)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    out = lmslice.save_sliced(model, None, tmp_path / "out")
    ids = torch.arange(12)[None]
    torch.save(model(input_ids=ids).logits, tmp_path / "expected.pt")
    code = (f"import sys; sys.modules['lmslice'] = None\n"
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)\n"
            f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
            "print((model(input_ids=torch.arange(12)[None]).logits - expected).abs().max().item())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0
