"""`lmslice report`: a sweep over sparsities writes a consistent JSON, a table and two readable PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from lmslice.cli import main
from lmslice.cli.report_command import parse_sparsities
from lmslice.errors import LmsliceError
from lmslice.evaluation.perplexity import perplexity
from lmslice.io.data import load_text, tokenize
from lmslice.report import plot_spectra
from lmslice.slicing import sliced_width
from test_eval import TASK, write_choice_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.ptp(pixels[..., :3]) > 0  # something was drawn


def test_report_writes_json_table_and_plots(dense_dir: Path, text_file: Path, tmp_path: Path, tiny_tokenizer,
                                            capsys) -> None:
    out = tmp_path / "report"
    tasks = write_choice_task(tmp_path / "tasks")
    code = main(["report", str(dense_dir), "--sparsities", "0.5,0,0.25", "--calib", str(text_file),
                 "--eval-data", str(text_file), "-o", str(out), "--calib-samples", "8", "--calib-seqlen", "32",
                 "--eval-seqlen", "64", "--eval-max-windows", "3", "--tasks", TASK, "--include-path", str(tasks),
                 "--limit", "2", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert printed["rows"] == report["rows"]
    assert {"model", "eval_data", "calibration", "parameters_dense", "rows", "spectra", "tasks"} <= set(report)

    rows = report["rows"]
    assert [row["sparsity"] for row in rows] == [0, 0.25, 0.5]
    assert [row["width"] for row in rows] == [sliced_width(64, row["sparsity"]) for row in rows]
    assert rows[0]["parameters"] == report["parameters_dense"] and rows[0]["parameters_fraction"] == 1
    # (the tiny model ties its head to the embeddings; slicing unties them, so 25% can exceed dense)
    assert rows[1]["parameters"] > rows[2]["parameters"]
    for row in rows:
        assert row["parameters_fraction"] == pytest.approx(row["parameters"] / report["parameters_dense"])
        assert np.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert 0 <= row["zero_shot_average"] <= 1 and row["zero_shot"][TASK]["items"] == 2

    # the dense row is the dense model's own perplexity on the same windows
    dense = tiny_models.build("llama", torch.float32)
    tokens = tokenize(tiny_tokenizer, load_text(str(text_file), split="test"))
    assert rows[0]["perplexity"] == pytest.approx(perplexity(dense, tokens, 64, max_windows=3,
                                                             progress=False).perplexity, rel=1e-5)

    spectra = report["spectra"]
    assert spectra["sparsity"] == 0.25
    assert {f"block{index}.output" for index in range(3)} <= set(spectra["values"])
    assert all(len(values) == 64 for values in spectra["values"].values())

    table = (out / "report.md").read_text()
    assert all(f"| {row['sparsity']:g} | {row['width']} |" in table for row in rows)
    assert_png(out / "perplexity.png")
    assert_png(out / "spectra.png")


def test_plot_spectra_from_python_tolerates_round_off(tmp_path: Path) -> None:
    values = {f"block{index}.output": [10.0 ** -k for k in range(16)] + [0.0, -1e-9] for index in range(12)}
    path = plot_spectra(values, tmp_path / "spectra.png", widths={0.25: 12})
    assert_png(path)
    with pytest.raises(LmsliceError, match="no block"):
        plot_spectra(values, tmp_path / "none.png", signal="residual1")


def test_sparsities_are_validated() -> None:
    assert parse_sparsities("0.3, 0,0.1", 8) == [0, 0.1, 0.3]
    for bad in ("0", "0.2,x", "1.0"):
        with pytest.raises(LmsliceError):
            parse_sparsities(bad, 8)
