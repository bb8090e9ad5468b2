"""The cost estimate a dry run prints: the device's measured speed, and how the estimate follows the
placement, the steps and the calibration (benchmarks/scale.py holds it against measured runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tiny_models
from lmslice.cli import main
from lmslice.adapters import find_adapter
from lmslice.estimate import Calibration, Estimate, Speed, block_shape, estimate, measure_speed
from lmslice.modeling import get_module
from lmslice.prune.config import PruneConfig
from lmslice.prune.measure import PLANNING_WINDOWS
from lmslice.slicing import SliceConfig, count_parameters
from test_failures import run_cli

# round numbers, so that the expected times below are exact
SPEED = Speed(gemm=1e9, gemm64=1e8, inverse=1e8, cholesky64=1e8, eigh64=1e7)
CALIBRATION = Calibration(samples=16, seqlen=32, batch_size=8)


def test_measured_speed_is_finite_and_float64_is_not_faster_than_float32_by_much() -> None:
    speed = measure_speed("cpu", size=256)
    rates = [speed.gemm, speed.gemm64, speed.inverse, speed.cholesky64, speed.eigh64]
    assert all(math.isfinite(rate) and rate > 0 for rate in rates)
    assert speed.gemm64 < 4 * speed.gemm  # float64 products are never several times faster


def test_the_weights_held_follow_the_placement() -> None:
    model = tiny_models.build("llama", torch.float32)
    shape = block_shape(model)
    costs = {placement: estimate(model, [PruneConfig(0.8)], placement, CALIBRATION, device="cpu",
                                 dtype=torch.float32, speed=SPEED, base_bytes=0)
             for placement in ("memory", "offload")}
    assert costs["memory"].memory["weights"] == count_parameters(model) * 4
    blocks = len(model.model.layers)
    assert costs["offload"].memory["weights"] == (count_parameters(model) - (blocks - 2) * shape.parameters) * 4
    assert costs["offload"].peak_bytes < costs["memory"].peak_bytes


def test_pruning_keeps_each_windows_mlp_input_and_the_fishers_block_inputs_and_slicing_does_not() -> None:
    model = tiny_models.build("llama", torch.float32)
    shape = block_shape(model)
    blocks = len(get_module(model, find_adapter(model).blocks))
    tokens = CALIBRATION.samples * CALIBRATION.seqlen
    planning = min(PLANNING_WINDOWS, CALIBRATION.samples) * CALIBRATION.seqlen
    pruned, sliced = (estimate(model, [config], "memory", CALIBRATION, device="cpu", dtype=torch.float32,
                               speed=SPEED, base_bytes=0).memory["calibration stream"]
                      for config in (PruneConfig(0.8), SliceConfig(0.25)))
    assert sliced == 2 * tokens * shape.hidden * 4
    assert pruned == sliced + tokens * shape.mlp * 4 + (blocks + 1) * planning * shape.hidden * 4


def test_saving_from_memory_adds_the_saved_copy_and_the_copy_read_back() -> None:
    model = tiny_models.build("llama", torch.float32)
    kept = count_parameters(model) // 2

    def cost(saved: int | None) -> Estimate:
        return estimate(model, [PruneConfig(0.5)], "memory", CALIBRATION, device="cpu", dtype=torch.float32,
                        stored_dtype=torch.float16, speed=SPEED, base_bytes=0, saved_parameters=saved)

    assert cost(kept).memory["saving"] == 2 * kept * 2
    assert cost(kept).peak_bytes == cost(None).peak_bytes + 2 * kept * 2


def test_time_grows_with_the_calibration_and_the_evaluation_adds_its_own() -> None:
    model = tiny_models.build("llama", torch.float32)

    def seconds(calibration: Calibration) -> dict[str, float]:
        return estimate(model, [PruneConfig(0.8, widths="uniform")], "memory", calibration, device="cpu",
                        dtype=torch.float32, speed=SPEED, base_bytes=0).seconds

    single, double = seconds(CALIBRATION), seconds(Calibration(32, 32, 8))
    assert set(single) == {"pruning"}  # uniform widths: no Fisher pass, no plan
    assert single["pruning"] < double["pruning"] < 2 * single["pruning"]  # the solvers do not grow with it
    evaluated = seconds(Calibration(16, 32, 8, eval_tokens=1024, eval_seqlen=32))
    assert evaluated["pruning"] == single["pruning"] and evaluated["evaluation"] > 0


@pytest.mark.parametrize("config, phases", [(PruneConfig(0.8), {"fisher and plan", "pruning"}),
                                            (SliceConfig(0.25), {"slicing"})])
def test_each_step_has_its_phases(config, phases: set[str]) -> None:
    model = tiny_models.build("llama", torch.float32)
    cost = estimate(model, [config], "memory", CALIBRATION, device="cpu", dtype=torch.float32, speed=SPEED,
                    base_bytes=0)
    assert set(cost.seconds) == phases and all(value > 0 for value in cost.seconds.values())


def test_dry_run_reads_no_weight_and_no_text_writes_nothing_and_says_what_the_run_would_do(
        capsys, dense_dir: Path, tmp_path: Path, monkeypatch) -> None:
    for loader in ("load_with_tokenizer", "open_offloaded"):
        monkeypatch.setattr(f"lmslice.io.placement.{loader}", pytest.fail)
    monkeypatch.setattr("lmslice.cli.slice_command.calibration_data", pytest.fail)
    out = tmp_path / "out"
    assert main(["compress", str(dense_dir), "--keep", "0.8", "--calib", "pydoc", "--dry-run", "--json",
                 "-o", str(out), "--gguf", str(tmp_path / "out.gguf")]) == 0
    plan = json.loads(capsys.readouterr().out)
    dense = plan["parameters_dense"]
    assert dense == count_parameters(tiny_models.build("llama")) and plan["parameters"] == round(0.8 * dense)
    assert plan["steps"] == ["prune"] and plan["placement"] == "memory" and plan["llama_cpp"] == "deci"
    assert plan["loads_in"].startswith("transformers (trust_remote_code=True)")  # measured per-block widths
    assert plan["estimated_peak_gib"] > 0 and plan["estimated_seconds"]["pruning"] > 0
    assert list(tmp_path.iterdir()) == []
    assert main(["compress", str(dense_dir), "--keep", "0.8", "--mlp-widths", "uniform", "--dry-run",
                 "-o", str(out)]) == 0
    report = capsys.readouterr().out
    assert "loads in       transformers;" in report and "peak memory    about" in report


def test_dry_run_refuses_what_the_run_refuses(capsys, dense_dir: Path, tmp_path: Path) -> None:
    for dry in ([], ["--dry-run"]):
        code, error = run_cli(capsys, "compress", dense_dir, "--keep", "0.8", "--round-to", "112", "--calib",
                              "pydoc", "-o", tmp_path / "out", *dry)
        assert code == 2 and "no narrower than the MLP" in error
