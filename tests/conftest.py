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


class _KeepFloat64Softmax:
    """torch.nn, except that `functional.softmax` keeps a float64 input in float64 when asked for float32."""

    class functional:  # noqa: N801 - stands for torch.nn.functional
        @staticmethod
        def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            if dtype is not None:
                dtype = torch.promote_types(input.dtype, dtype)
            return torch.nn.functional.softmax(input, dim=dim, dtype=dtype)

        def __getattr__(self, name: str):
            return getattr(torch.nn.functional, name)

    functional = functional()

    def __getattr__(self, name: str):
        return getattr(torch.nn, name)


@pytest.fixture(autouse=True, scope="session")
def float64_softmax_in_eager_attention():
    """Gemma 2's attention runs eager only (its scores are soft-capped), and eager attention takes its softmax
    in float32 even in a float64 model: that caps a float64 reference's accuracy near 1e-7, and casts the
    float64 mask minimum to -inf, so a left-padded row's fully masked queries give NaN, which the attention
    then spreads to every token. The tests' float64 models keep the softmax in float64."""
    import transformers.models.gemma2.modeling_gemma2 as gemma2

    patch = pytest.MonkeyPatch()
    patch.setattr(gemma2, "nn", _KeepFloat64Softmax())
    yield
    patch.undo()


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
