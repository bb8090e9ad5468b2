from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

import tiny_models
from tiny_models import VOCAB

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"

# OMP_NUM_THREADS when set: torch.set_num_threads overrides it, and two spinning threads on a busy shared
# machine made the tiny models' tests ten times slower (test_save_load's decode tests: 161 s vs 15 s).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the tiny models' vocabulary size, trained on local prose."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text()[:60_000])
    return path


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny dense Llama with its tokenizer, saved once per test module (tests must not change it)."""
    path = tmp_path_factory.mktemp("dense") / "tiny-llama"
    tiny_models.build("llama", torch.float32).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
