"""`lmslice finetune` as `accelerate launch` starts it in each process, recording the training windows this
process's student forwarded: `python launched_finetune.py RECORD_DIR finetune MODEL ...` writes
RECORD_DIR/process-<index>.pt, one (windows x tokens) tensor of token ids per training step.

The student's input embedding sees exactly what the student trains on (the teacher has its own); the hook
goes on only for training, so the first process's perplexity measurements are not recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState

import lmslice.cli.finetune_command as command
from lmslice.cli import main


def recording_finetune(record: Path):
    finetune = command.finetune

    def record_then_finetune(model: torch.nn.Module, *args, **kwargs):
        seen: list[torch.Tensor] = []
        hook = model.get_input_embeddings().register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
        try:
            return finetune(model, *args, **kwargs)
        finally:
            hook.remove()
            torch.save([ids.cpu() for ids in seen], record / f"process-{PartialState().process_index}.pt")

    return record_then_finetune


if __name__ == "__main__":
    command.finetune = recording_finetune(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
