from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from maverick_serve.engine.native.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


@pytest.mark.parametrize("text", ["plain ascii words", "emoji 🦙🦙 and 中文字符 mixed", "naïve café — ok"])
def test_streamed_deltas_join_to_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    deltas = [detok.append(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)  # split characters are held, never emitted broken
    assert sum(1 for d in deltas if d) > 3  # and it really streams


def test_random_tokens_match_full_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(0, 1920) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        joined = "".join(detok.append(t) for t in ids) + detok.flush()
        assert joined == tokenizer.decode(ids, skip_special_tokens=True)
