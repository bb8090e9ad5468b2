"""Data-parallel recovery: `lmslice finetune` started by `accelerate launch` in two CPU processes (gloo)
trains each process on its own part of every batch and saves, once, the model one process trains on the
same batches; a batch too small to split is refused before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import launched_finetune
import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.finetune import check_shares
from lmslice.slicing import slice_model

# Two processes importing torch and training a tiny model take about 20 s on a busy two-core machine; a
# process that waits for a collective the other never joins would otherwise wait for gloo's 30 minutes.
LAUNCH_TIMEOUT = 240


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A sliced tiny Llama kept in float64: one process's rounding and two processes' are then far below the
    tolerance, where float32 Adam can flip the step of a weight whose gradient is near 0."""
    model = tiny_models.build("llama", torch.float64)
    slice_model(model, tiny_models.random_batches(), 0.25, progress=False)
    return lmslice.save_sliced(model, tiny_tokenizer, tmp_path_factory.mktemp("distributed") / "sliced")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(record: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), launched_finetune.__file__, str(record), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("objective", [
    ["--distill-from", "DENSE", "--full-parameters", "--lm-weight", "0.5"],
    ["--lora-r", "4", "--lora-dropout", "0"],
], ids=["distillation", "lora"])
def test_two_processes_train_what_one_trains_each_on_its_part_of_every_batch(
        objective: list[str], sliced_dir: Path, dense_dir: Path, text_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    objective = [str(dense_dir) if option == "DENSE" else option for option in objective]
    # batches of 3 windows: the first process trains on 2 of each, the second on 1
    arguments = ["finetune", str(sliced_dir), "--data", str(text_file), *objective, "--samples", "6", "--seqlen",
                 "32", "--batch-size", "3", "--lr", "1e-3", "--dtype", "float64", "--device", "cpu",
                 "--eval-seqlen", "64", "--eval-max-windows", "1", "--json"]
    records = {count: tmp_path / f"record-{count}" for count in (1, 2)}
    for record in records.values():
        record.mkdir()

    launched = launch_two_processes(records[2], [*arguments, "-o", str(tmp_path / "two")])
    assert launched.returncode == 0, launched.stderr[-3000:]
    monkeypatch.setattr(launched_finetune.command, "finetune", launched_finetune.recording_finetune(records[1]))
    assert main([*arguments, "-o", str(tmp_path / "one")]) == 0

    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    printed = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # only the first process reports
    two = json.loads(printed[0])
    assert (two["processes"], one["processes"]) == (2, 1)
    assert (two["steps"], two["tokens"]) == (one["steps"], one["tokens"]) == (2, 2 * 3 * 32)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=1e-9)  # the whole batch's loss, gathered

    # each process trained on its own consecutive windows of every batch, and together on the whole batch
    (windows,), shares = ([torch.load(record / f"process-{index}.pt") for index in range(count)]
                          for count, record in sorted(records.items()))
    assert [len(share) for share in shares[0]] == [2, 2] and [len(share) for share in shares[1]] == [1, 1]
    for step, batch in enumerate(windows):
        assert torch.equal(torch.cat([shares[0][step], shares[1][step]]), batch)

    # saved once, and the same model as one process's
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    original = lmslice.load(sliced_dir)
    single, parallel = lmslice.load(tmp_path / "one"), lmslice.load(tmp_path / "two")
    for name, weight in single.named_parameters():
        assert (parallel.get_parameter(name) - weight).abs().max() <= 1e-9 * weight.abs().max(), name
    assert any(not torch.equal(weight, original.get_parameter(name)) for name, weight in single.named_parameters())


def test_a_batch_too_small_to_split_is_refused_before_loading(dense_dir: Path, text_file: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import lmslice.cli.finetune_command as command

    monkeypatch.setattr(command, "PartialState", lambda cpu: SimpleNamespace(num_processes=2))
    monkeypatch.setattr(command, "load_with_tokenizer", None)  # loading would fail the test
    code = main(["finetune", str(dense_dir), "--data", str(text_file), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "--samples", "5", "--batch-size", "2"])
    assert code == 2 and capsys.readouterr().err == (
        "lmslice: error: 2 processes split every batch of windows, but one has 1: give a --batch-size of at least "
        "2 and --samples a multiple of it\n")
    with pytest.raises(LmsliceError, match="training batch 1 has 1 windows, fewer than the 2 processes"):
        check_shares([2, 1], 2)
