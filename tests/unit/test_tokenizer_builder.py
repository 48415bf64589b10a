"""The tiny checkpoint's tokenizer: deterministic, lossless, Llama 4 special ids and template."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from maverick_serve.model.tokenizer_builder import (
    LLAMA4_CHAT_TEMPLATE,
    LLAMA4_SPECIAL_TOKENS,
    SpecialTokenIds,
    build_tokenizer,
    render_chat_prompt,
    special_token_ids,
    write_tokenizer_files,
)

# Real Llama 4 ids (facts.md, llama-models tokenizer.py).
REAL_IDS = {
    "<|begin_of_text|>": 200000,
    "<|end_of_text|>": 200001,
    "<|fim_prefix|>": 200002,
    "<|fim_middle|>": 200003,
    "<|fim_suffix|>": 200004,
    "<|header_start|>": 200005,
    "<|header_end|>": 200006,
    "<|eom|>": 200007,
    "<|eot|>": 200008,
    "<|step|>": 200009,
    "<|text_post_train_reserved_special_token_0|>": 200010,
    "<|python_start|>": 200016,
    "<|python_end|>": 200017,
    "<|finetune_right_pad|>": 200018,
    "<|text_post_train_reserved_special_token_8|>": 200019,
    "<|text_post_train_reserved_special_token_68|>": 200079,
    "<|image_start|>": 200080,
    "<|image_end|>": 200081,
    "<|vision_reserved_special_token_0|>": 200082,
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    "<|image|>": 200090,
    "<|patch|>": 200092,
    "<|vision_reserved_special_token_7|>": 200093,
    "<|vision_reserved_special_token_1047|>": 201133,
    "<|reasoning_thinking_start|>": 201142,
    "<|reasoning_thinking_end|>": 201143,
    "<|reserved_special_token_0|>": 201144,
    "<|reserved_special_token_903|>": 202047,
}

_WRITE_SCRIPT = (
    "import sys; from pathlib import Path; "
    "from maverick_serve.model.tokenizer_builder import write_tokenizer_files; "
    "write_tokenizer_files(Path(sys.argv[1]))"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out)
    return out


def test_special_token_list_matches_real_ids() -> None:
    assert len(LLAMA4_SPECIAL_TOKENS) == 2048
    assert len(set(LLAMA4_SPECIAL_TOKENS)) == 2048
    for token, real_id in REAL_IDS.items():
        assert LLAMA4_SPECIAL_TOKENS.index(token) == real_id - 200000, token
    assert special_token_ids(200000)["<|patch|>"] == 200092


def test_special_token_ids_dataclass_real_and_tiny() -> None:
    real = SpecialTokenIds.for_base_vocab(200000)
    assert (real.bos, real.eos, real.pad, real.eot) == (200000, (200001, 200007, 200008), 200018, 200008)
    assert (real.header_start, real.header_end) == (200005, 200006)
    assert (real.image_start, real.image_end, real.image, real.patch) == (200080, 200081, 200090, 200092)
    assert (real.tile_x_separator, real.tile_y_separator) == (200084, 200085)
    tiny = SpecialTokenIds.for_base_vocab(1920)
    assert (tiny.bos, tiny.eos, tiny.pad, tiny.patch) == (1920, (1921, 1927, 1928), 1938, 2012)


def test_vocab_layout(tok: Tokenizer) -> None:
    assert tok.get_vocab_size(with_added_tokens=True) == 2048
    assert tok.get_vocab_size(with_added_tokens=False) == 1920
    for i, token in enumerate(LLAMA4_SPECIAL_TOKENS[:128]):
        assert tok.token_to_id(token) == 1920 + i, token
    assert tok.token_to_id(LLAMA4_SPECIAL_TOKENS[128]) is None
    # All 256 byte symbols are in the base vocabulary, so nothing is ever unknown.
    vocab = tok.get_vocab(with_added_tokens=False)
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(vocab)
    assert sorted(vocab.values()) == list(range(1920))


def test_other_sizes() -> None:
    t = build_tokenizer(base_vocab_size=1000, num_special=256)
    assert t.get_vocab_size() == 1256
    assert t.token_to_id("<|patch|>") == 1092
    with pytest.raises(ValueError, match="num_special"):
        build_tokenizer(num_special=50)  # would drop <|patch|> (offset 92)
    with pytest.raises(ValueError, match="corpus only supports"):
        build_tokenizer(base_vocab_size=100_000)


ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand more",
    "café naïve Zürich Łódź",
    "日本語のテキストと中文文本、한국어",
    "emoji 😀🚀👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "RTL: العربية עברית",
    "combining: e\u0301 a\u0308 \u200b zero-width \ufeff bom",
    "control: \x00\x01\x7f and surrogates-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x: int) -> int:\n    return x ** 2  # comment\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert all(i < 1920 for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_random_codepoints(tok: Tokenizer) -> None:
    import random

    rng = random.Random(1234)
    for _ in range(50):
        chars = []
        for _ in range(rng.randint(1, 40)):
            cp = rng.randint(0, 0x10FFFF)
            if 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid UTF-8
                cp = 0x20
            chars.append(chr(cp))
        text = "".join(chars)
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_bos_added_by_post_processor(tok: Tokenizer) -> None:
    assert tok.encode("hi").ids[0] == 1920
    assert tok.encode("hi", add_special_tokens=False).ids[0] != 1920
    # Special-token text is recognised as the special token (as in the real tokenizer).
    assert tok.encode("<|eot|>", add_special_tokens=False).ids == [1928]


def test_deterministic_bytes_across_processes(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for seed, d in zip(("1", "2"), dirs, strict=True):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TOKENIZERS_PARALLELISM": "true"}
        subprocess.run([sys.executable, "-c", _WRITE_SCRIPT, str(d)], check=True, env=env, timeout=300)
    names = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dirs[0].iterdir()) == names
    for name in names:
        assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name
    # ... and equal to an in-process build.
    assert (dirs[0] / "tokenizer.json").read_text() == build_tokenizer().to_str(pretty=True) + "\n"


def test_template_is_transformers_llama4_template() -> None:
    from transformers.models.llama4.processing_llama4 import chat_template

    assert chat_template == LLAMA4_CHAT_TEMPLATE


def test_render_chat_prompt_text() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    assert render_chat_prompt(messages) == (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\n<|image|>What is it?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nA cat.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nSure?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert render_chat_prompt(messages[1:2], add_generation_prompt=False) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>What is it?<|eot|>"
    )


CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello there"}]},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}],
            },
            {"role": "assistant", "content": "They differ. 日本 😀"},
            {"role": "user", "content": "Why?"},
        ]
    },
    {"messages": [{"role": "user", "content": "no prompt"}], "add_generation_prompt": False},
    {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": {"temp_c": 21}},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    },
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_autotokenizer_chat_template_matches_ours(
    tok_dir: Path, tok: Tokenizer, conv: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    add_gen = conv.get("add_generation_prompt", True)
    tools = conv.get("tools")
    hf_text = hf.apply_chat_template(
        conv["messages"], tools=tools, add_generation_prompt=add_gen, tokenize=False
    )
    ours = render_chat_prompt(conv["messages"], add_generation_prompt=add_gen, tools=tools)
    assert hf_text == ours
    hf_ids: Any = hf.apply_chat_template(
        conv["messages"], tools=tools, add_generation_prompt=add_gen, tokenize=True
    )
    if not isinstance(hf_ids, list):
        hf_ids = hf_ids["input_ids"]
    assert hf_ids == tok.encode(ours, add_special_tokens=False).ids
    assert hf_ids[0] == 1920 and hf_ids.count(1920) == 1


def test_autotokenizer_special_tokens(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1920, 1928, 1938)
    assert len(hf) == 2048
    assert hf.convert_tokens_to_ids(["<|image|>", "<|patch|>", "<|python_start|>"]) == [2010, 2012, 1936]
    assert hf("hi there")["input_ids"][0] == 1920
    text = "café 😀 日本"
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
