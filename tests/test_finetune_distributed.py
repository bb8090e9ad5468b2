"""Data-parallel recovery: `lmslice finetune` started by `accelerate launch` in two CPU processes (gloo)
trains each process on its own part of every batch and saves, once, the model one process trains on the
same batches; a batch too small to split, and a launch that shards the model (FSDP), are refused."""

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
from accelerate.utils import DistributedType

import launched_finetune
import lmslice
import tiny_models
from lmslice.cli import main
from lmslice.errors import LmsliceError
from lmslice.finetune import check_data_parallel, check_shares
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


def test_two_processes_train_what_one_trains_each_on_its_part_of_every_batch(
        sliced_dir: Path, dense_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys) -> None:
    """Distillation with its next-token term, through LoRA adapters (without dropout, whose masks differ by
    process), in one launch: each costs two processes' start. Every parameter trained the same way was
    checked when this was written; the loop is the same but for which weights it steps."""
    # batches of 3 windows: the first process trains on 2 of each, the second on 1
    arguments = ["finetune", str(sliced_dir), "--data", str(text_file), "--distill-from", str(dense_dir),
                 "--lm-weight", "0.5", "--lora-r", "4", "--lora-dropout", "0", "--samples", "6", "--seqlen",
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

    # each process trained on its own consecutive windows of every batch, and together on the whole batch
    batches = torch.load(records[1] / "process-0.pt")
    first, second = (torch.load(records[2] / f"process-{index}.pt") for index in range(2))
    assert [len(share) for share in first] == [2, 2] and [len(share) for share in second] == [1, 1]
    for batch, first_share, second_share in zip(batches, first, second, strict=True):
        assert torch.equal(torch.cat([first_share, second_share]), batch)

    # saved once (a second save would find the output there and fail), leaving nothing beside it; one
    # process's model
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    original = lmslice.load(sliced_dir)
    single, parallel = lmslice.load(tmp_path / "one"), lmslice.load(tmp_path / "two")
    for name, weight in single.named_parameters():
        difference = ((parallel.get_parameter(name) - weight).abs().max() / weight.abs().max()).item()
        assert difference <= 1e-9, name  # measured: 0 (one process's batch loss unweighted by share: 6e-3)
    assert any(not torch.equal(weight, original.get_parameter(name)) for name, weight in single.named_parameters())
    # the whole batch's loss, gathered (the distillation loss is computed in float32)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=1e-6)


def test_a_batch_too_small_to_split_is_refused_before_loading(dense_dir: Path, text_file: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import lmslice.cli.finetune_command as command

    monkeypatch.setattr(command, "Accelerator", lambda cpu, device_placement: SimpleNamespace(
        num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.setattr(command, "load_with_tokenizer", None)  # loading would fail the test
    code = main(["finetune", str(dense_dir), "--data", str(text_file), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "--samples", "5", "--batch-size", "2"])
    assert code == 2 and capsys.readouterr().err == (
        "lmslice: error: 2 processes split every batch of windows, but one has 1: give a --batch-size of at least "
        "2 and --samples a multiple of it\n")
    with pytest.raises(LmsliceError, match="training batch 1 has 1 windows, fewer than the 2 processes"):
        check_shares([2, 1], 2)


def test_launches_that_shard_the_model_are_refused() -> None:
    with pytest.raises(LmsliceError, match="trains data-parallel, not with FSDP: launch it with `accelerate launch"):
        check_data_parallel(DistributedType.FSDP)
    check_data_parallel(DistributedType.MULTI_GPU)
