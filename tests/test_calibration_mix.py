"""`--calib` mixes: sources in stated shares, each giving its share of the windows, shuffled together; one
source gives the windows it always gave; malformed mixes are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmslice.cli import build_parser, main
from lmslice.errors import LmsliceError
from lmslice.io.data import (MixPart, calibration_batches, load_text, mix_record, mix_windows,
                             mixed_calibration_batches, parse_mix, tokenize)


def test_mixes_parse_into_normalised_shares(tmp_path: Path) -> None:
    assert parse_mix("pydoc") == [MixPart("pydoc", 1.0)]
    assert parse_mix("wikitext2,pydoc") == [MixPart("wikitext2", 0.5), MixPart("pydoc", 0.5)]
    assert parse_mix("a.txt:0.7, pydoc:0.3") == [MixPart("a.txt", 0.7), MixPart("pydoc", 0.3)]
    assert [part.share for part in parse_mix("a:3,b:1")] == [0.75, 0.25]
    odd = tmp_path / "odd,name:1.txt"
    odd.write_text("text")
    assert parse_mix(str(odd)) == [MixPart(str(odd), 1.0)]  # an existing file is one source, whatever its name


@pytest.mark.parametrize("spec, message", [
    ("a,a", "names a source twice"), ("a:0.5,b", "for every source or for none"), ("a:0,b:1", "positive"),
    ("a:nan,b:1", "positive"), (",pydoc", "empty source"), ("a:inf,b:1", "positive"),
])
def test_malformed_mixes_are_refused(spec: str, message: str) -> None:
    with pytest.raises(LmsliceError, match=message):
        parse_mix(spec)


def test_windows_follow_the_shares_and_sum_to_the_samples() -> None:
    assert mix_windows(parse_mix("a:0.7,b:0.3"), 32) == [22, 10]
    assert mix_windows(parse_mix("a,b,c"), 32) == [11, 11, 10]
    with pytest.raises(LmsliceError, match="more --calib-samples"):
        mix_windows(parse_mix("a:0.99,b:0.01"), 8)
    assert mix_record("a:0.7,b:0.3", 32) == [{"source": "a", "share": 0.7, "windows": 22},
                                             {"source": "b", "share": 0.3, "windows": 10}]


def test_each_source_gives_its_share_of_the_windows_shuffled_together(tmp_path: Path, tiny_tokenizer) -> None:
    prose, digits = tmp_path / "prose.txt", tmp_path / "digits.txt"
    prose.write_text("the cat sat on the mat and looked at the hat " * 200)
    digits.write_text("0123456789" * 400)
    digit_tokens = set(tokenize(tiny_tokenizer, digits.read_text()).tolist())
    assert not digit_tokens & set(tokenize(tiny_tokenizer, prose.read_text()).tolist())
    batches = mixed_calibration_batches(tiny_tokenizer, f"{prose}:0.75,{digits}:0.25", 16, 12, 4, seed=3)
    windows = torch.cat([batch["input_ids"] for batch in batches])
    assert windows.shape == (16, 12)
    from_digits = [set(window.tolist()) <= digit_tokens for window in windows]
    assert sum(from_digits) == 4
    assert any(from_digits[:8]) or any(from_digits[8:12])  # shuffled: not all at the end
    assert len({tuple(window.tolist()) for window in windows}) > 2


def test_one_source_gives_the_windows_it_always_gave(text_file: Path, tiny_tokenizer) -> None:
    tokens = tokenize(tiny_tokenizer, load_text(str(text_file), split="train"))
    expected = calibration_batches(tokens, 6, 16, 2, seed=5)
    got = mixed_calibration_batches(tiny_tokenizer, str(text_file), 6, 16, 2, seed=5)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(expected, got, strict=True))


def test_slice_records_the_mix(dense_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sliced"
    code = main(["slice", str(dense_dir), "--sparsity", "0.25", "--calib", f"{text_file}:0.5,pydoc:0.5",
                 "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = [{"source": str(text_file), "share": 0.5, "windows": 2}, {"source": "pydoc", "share": 0.5, "windows": 2}]
    assert summary["calibration"]["mix"] == expected
    assert json.loads((out / "config.json").read_text())["lmslice"]["calibration"]["mix"] == expected


def test_a_malformed_mix_is_refused_before_loading(tmp_path: Path, capsys) -> None:
    code = main(["slice", "no-such-model", "--sparsity", "0.25", "--calib", "pydoc,pydoc", "-o", str(tmp_path / "o")])
    assert code == 2 and "names a source twice" in capsys.readouterr().err


def test_the_default_calibration_needs_no_network_or_extra() -> None:
    from lmslice.io.data import HUB_SOURCES

    for command in (["compress", "MODEL", "--keep", "0.8", "-o", "OUT"], ["slice", "MODEL", "--sparsity", "0.25", "-o", "OUT"],
                    ["report", "MODEL", "--eval-data", "pydoc", "-o", "OUT"]):
        default = build_parser().parse_args(command).calib
        assert [part.source for part in parse_mix(default) if part.source in HUB_SOURCES] == [], command
