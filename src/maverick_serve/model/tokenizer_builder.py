"""Deterministic, offline byte-level BPE tokenizer for the tiny Llama 4 checkpoint.

The real Llama 4 tokenizer (200000 BPE tokens + 2048 special tokens) cannot be shipped or
downloaded here, so the tiny checkpoint gets its own: a small byte-level BPE trained on a
fixed corpus embedded below, with the Llama 4 pre-tokenizer regex and the Llama 4 special
tokens in their real order. Special token ``k`` (offset from the base vocabulary) has id
``base_vocab_size + k``, exactly as token ``200000 + k`` in the real model, so code that
works with offsets (image tokens, stop tokens, the chat template) behaves the same on both.

Sources for the special-token table and template (verified, not guessed):
- ``meta-llama/llama-models`` ``models/llama4/tokenizer.py``: ``BASIC_SPECIAL_TOKENS`` +
  ``LLAMA4_TEXT_POST_TRAIN_SPECIAL_TOKENS`` + ``LLAMA4_VISION_SPECIAL_TOKENS`` +
  ``LLAMA4_REASONING_SPECIAL_TOKENS``, then ``<|reserved_special_token_N|>`` up to 2048, and
  its ``O200K_PATTERN`` split regex.
- transformers ``models/llama4/processing_llama4.py``: the instruct chat template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REAL_BASE_VOCAB_SIZE = 200_000
"""Size of the real Llama 4 BPE vocabulary; special tokens start here in Scout/Maverick."""
REAL_NUM_SPECIAL = 2048
DEFAULT_BASE_VOCAB_SIZE = 1920
DEFAULT_NUM_SPECIAL = 128
DEFAULT_MODEL_MAX_LENGTH = 10_485_760
"""Scout's max_position_embeddings; the tokenizer limit is not what bounds the tiny model."""

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot|>"
"""End of an instruct turn: what a chat completion stops on (generation also stops on
<|end_of_text|> and <|eom|>; see `SpecialTokenIds.eos`)."""
PAD_TOKEN = "<|finetune_right_pad|>"


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


# Offsets 0..4 (ids 200000..200004).
_BASIC_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
]
# Offsets 5..79 (ids 200005..200079).
_TEXT_POST_TRAIN_SPECIAL_TOKENS = [
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    *_reserved("text_post_train", 6),
    "<|python_start|>",  # 200016
    "<|python_end|>",  # 200017
    "<|finetune_right_pad|>",  # 200018
    *_reserved("text_post_train", 61, 8),
]
# Offsets 80..1133 (ids 200080..201133).
_VISION_SPECIAL_TOKENS = [
    "<|image_start|>",
    "<|image_end|>",
    "<|vision_reserved_special_token_0|>",
    "<|vision_reserved_special_token_1|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    *_reserved("vision", 4, 2),
    "<|image|>",  # 200090
    "<|vision_reserved_special_token_6|>",
    "<|patch|>",  # 200092
    *_reserved("vision", 1041, 7),
]
# Offsets 1134..1143 (ids 201134..201143).
_REASONING_SPECIAL_TOKENS = [
    *_reserved("reasoning", 8),
    "<|reasoning_thinking_start|>",
    "<|reasoning_thinking_end|>",
]
_NAMED = [
    *_BASIC_SPECIAL_TOKENS,
    *_TEXT_POST_TRAIN_SPECIAL_TOKENS,
    *_VISION_SPECIAL_TOKENS,
    *_REASONING_SPECIAL_TOKENS,
]

LLAMA4_SPECIAL_TOKENS: list[str] = _NAMED + [
    f"<|reserved_special_token_{i}|>" for i in range(REAL_NUM_SPECIAL - len(_NAMED))
]
"""All 2048 Llama 4 special tokens in real order: index == real id - 200000."""

# The Llama 4 pre-tokenizer split (tiktoken pat_str of llama-models' Llama 4 tokenizer).
LLAMA4_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The instruct template shipped by transformers' Llama4Processor (the Hub repos carry the same).
LLAMA4_CHAT_TEMPLATE: str = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    "    {%- else %}\n"
    '        {%- set date_string = "26 Jul 2024" %}\n'
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}    \n"
    "    {%- if messages[0]['content'] is string %}\n"
    "        {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- else %}\n"
    "        {#- FIXME: The processor requires an array, always. #}\n"
    "        {%- set system_message = messages[0]['content'][0]['text']|trim %}\n"
    "    {%- endif %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "    {%- set user_supplied_system_message = true %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "    {%- set user_supplied_system_message = false %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- System message if the user supplied one #}\n"
    "{%- if user_supplied_system_message %}\n"
    '    {{- "<|header_start|>system<|header_end|>\n\n" }}\n'
    "    {%- if tools is not none %}\n"
    '        {{- "Environment: ipython\n" }}\n'
    "    {%- endif %}\n"
    "    {%- if tools is not none and not tools_in_user_message %}\n"
    '        {{- "You have access to the following functions. To call a function, please respond with JSON'
    ' for a function call." }}\n'
    '        {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument'
    " name and its value}.' }}\n"
    '        {{- "Do not use variables.\n\n" }}\n'
    "        {%- for t in tools %}\n"
    "            {{- t | tojson(indent=4) }}\n"
    '            {{- "\n\n" }}\n'
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- system_message }}\n"
    '    {{- "<|eot|>" }}\n'
    "{%- endif %}\n"
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user"
    ' message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|header_start|>user<|header_end|>\n\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\n\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument'
    " name and its value}.' }}\n"
    '    {{- "Do not use variables.\n\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\n\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] }}\n"
    "        {%- else %}\n"
    "            {%- for content in message['content'] %}\n"
    "                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n"
    "                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot|>" }}\n'
    "    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}\n"
    "       {{- '<|header_start|>assistant<|header_end|>\n\n' -}}\n"
    "       {{- '<|python_start|>' }}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] }}\n"
    "        {%- else %}\n"
    "            {%- for content in message['content'] %}\n"
    "                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n"
    "                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "       {{- '<|python_end|>' }}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "           {{- '{\"name\": \"' + tool_call.function.name + '\", ' }}\n"
    "           {{- '\"parameters\": ' }}\n"
    "           {{- tool_call.function.arguments | tojson }}\n"
    '           {{- "}" }}\n'
    "        {%- endfor %}\n"
    '       {{- "<|eot|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|header_start|>ipython<|header_end|>\n\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|header_start|>assistant<|header_end|>\n\n' }}\n"
    "{%- endif %}\n"
)

# Fixed training corpus. Changing a single byte changes the vocabulary (and every tiny
# checkpoint built from it), so treat it as frozen data.
_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A model that serves many users at once has to
share its memory between them: every request keeps a cache of keys and values for each layer,
and that cache grows with the length of the conversation. When the cache is full, the server
must either wait, evict an older request, or move part of the cache to a slower tier such as
host memory or a remote store. Good schedulers keep the accelerator busy while they do this.

Mixture-of-experts models route every token to a small number of experts. The router scores
each expert, keeps the best one, and scales the expert's input by the sigmoid of its score.
A shared expert runs for every token, so the output is the sum of the shared expert and the
routed expert. Expert parallelism places different experts on different devices; tokens are
dispatched to the device that holds their expert and the results are combined afterwards.

Long context changes the shape of the problem. Most layers use chunked attention, where a
query only sees keys from its own chunk of eight thousand tokens, while every fourth layer
attends to the whole prefix without positional rotation. The cache for the chunked layers is
bounded, and the cache for the global layers grows with the prompt. Prefix caching lets two
requests that start with the same system prompt or the same document share those blocks.

Images are cut into tiles of three hundred and thirty-six pixels. Each tile becomes a grid of
patches; pixel shuffle folds four patches into one token, so a tile costs one hundred and
forty-four tokens. Large images use up to sixteen tiles plus a global thumbnail of the whole
picture. The prompt marks where an image starts and ends and separates tiles and rows.

Roles in a chat: system, user, assistant, tool and ipython. The system message sets the rules,
the user asks, and the assistant answers; a tool result comes back as an ipython message.
Questions people ask a chat assistant: What is the weather like today? How do I bake bread?
Can you explain this error message? Please summarise the following article in three short
paragraphs. Translate "good morning" into French, German, Spanish and Italian. Write a haiku
about autumn leaves. Which is larger, a kilometre or a mile? Why is the sky blue? They're
sure it'll work, but we've seen it fail; I'm not convinced you'd agree, and she'll check.

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 24 32 48 64 100 128 256 512 1024 2048
4096 8192 16384 65536 131072 1048576 10485760 3.14159 2.71828 1e-5 0.5 -1 +42 99% $19.99
2024-07-26 2025-04-05 12:30:45 v1.2.3 #127 @user ~/home/user/data /usr/local/bin:/usr/bin

def attention(query, key, value, mask=None):
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
    if mask is not None:
        scores = scores.masked_fill(mask == 0, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ value


class KVCache:
    \"\"\"Fixed-size blocks of keys and values, addressed by block id.\"\"\"

    def __init__(self, num_blocks: int, block_size: int, num_heads: int, head_dim: int) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))
        self.keys = torch.zeros(num_blocks, block_size, num_heads, head_dim)
        self.values = torch.zeros_like(self.keys)

    def allocate(self, num_tokens: int) -> list[int]:
        needed = (num_tokens + self.block_size - 1) // self.block_size
        if needed > len(self.free):
            raise RuntimeError(f"out of cache blocks: need {needed}, have {len(self.free)}")
        blocks, self.free = self.free[:needed], self.free[needed:]
        return blocks

for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
fn main() { let xs: Vec<u32> = (1..=10).collect(); println!("{:?}", xs); }
SELECT id, name, created_at FROM requests WHERE status = 'done' ORDER BY created_at DESC;
{"model": "llama-4", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}
apiVersion: v1
kind: Service
metadata:
  name: maverick-serve
spec:
  ports:
    - port: 8000
      targetPort: http
<html><body><p class="note">Hello, world &amp; friends</p></body></html>
$ pip install --upgrade tokenizers && python -m pytest -q tests/unit

Unicode: café naïve résumé Zürich São Paulo København Øresund Łódź Ελληνικά Русский текст
日本語のテキスト 中文文本 한국어 텍스트 हिन्दी पाठ العربية עברית ไทย Tiếng Việt 😀 🚀 ✓ → ∑ ∞ ≤ ≥ ±
Emoji and symbols appear in chat too: 👍 🎉 ❤️ ☕ — “quoted” ‘text’ … • © ® ™ ° € £ ¥

The tokenizer turns text into bytes, then merges frequent pairs of bytes into larger pieces.
Frequent words become single tokens; rare words are spelled from smaller pieces; any byte can
always be represented, so no input is ever unknown. Special tokens are never produced from
ordinary text by accident: they are added by the chat template or by the image processor.
Latency matters: the time to the first token depends on the prompt, and the time between
tokens depends on the batch. Throughput matters: the more requests share a step, the more
tokens come out per second, until memory or compute runs out. Benchmarks should report both,
along with the hardware, the software versions, and the exact workload used to measure them.
"""


def _training_corpus() -> list[str]:
    """The corpus as lines, plus the numbers 0..999 so 1-3 digit groups become tokens
    (as in real Llama vocabularies) and small corpora still reach the requested size."""
    lines = _CORPUS_TEXT.splitlines(keepends=True)
    lines.extend(f"{i} " for i in range(1000))
    return lines


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA4_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def build_tokenizer(
    base_vocab_size: int = DEFAULT_BASE_VOCAB_SIZE, num_special: int = DEFAULT_NUM_SPECIAL
) -> Tokenizer:
    """Train the byte-level BPE on the fixed corpus and append the first `num_special`
    Llama 4 special tokens at ids `base_vocab_size + offset`.

    Deterministic: the BPE trainer breaks count ties by token ids, so the same arguments give
    byte-identical `to_str()` in any process.
    """
    if base_vocab_size < 256:
        raise ValueError(f"base_vocab_size must be >= 256 (the byte alphabet), got {base_vocab_size}")
    if not 1 <= num_special <= len(LLAMA4_SPECIAL_TOKENS):
        raise ValueError(f"num_special must be in 1..{len(LLAMA4_SPECIAL_TOKENS)}, got {num_special}")
    offsets = special_token_offsets()
    needed = max(offsets[t] for t in _REQUIRED_TOKENS) + 1
    if num_special < needed:
        raise ValueError(f"num_special must be >= {needed} to include <|patch|>, got {num_special}")

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=False)
    if got != base_vocab_size:
        raise ValueError(
            f"the embedded corpus only supports a base vocabulary of {got} tokens, "
            f"base_vocab_size={base_vocab_size} requested"
        )
    # Trained BPE models forget ignore_merges; rebuild with the Llama 3/4 setting.
    state = json.loads(tok.to_str())
    state["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(state))

    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in LLAMA4_SPECIAL_TOKENS[:num_special]
        ]
    )
    bos_id = base_vocab_size
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    for i, t in enumerate(LLAMA4_SPECIAL_TOKENS[:num_special]):
        if tok.token_to_id(t) != base_vocab_size + i:  # pragma: no cover - invariant
            raise AssertionError(f"{t} landed at {tok.token_to_id(t)}, expected {base_vocab_size + i}")
    return tok


def special_token_offsets() -> dict[str, int]:
    """Offset of every Llama 4 special token from the start of the special range."""
    return {t: i for i, t in enumerate(LLAMA4_SPECIAL_TOKENS)}


def special_token_ids(base_vocab_size: int, num_special: int = REAL_NUM_SPECIAL) -> dict[str, int]:
    """Token -> id for the first `num_special` special tokens of a vocabulary whose BPE part
    has `base_vocab_size` entries (200000 for Scout/Maverick)."""
    return {t: base_vocab_size + i for i, t in enumerate(LLAMA4_SPECIAL_TOKENS[:num_special])}


_REQUIRED_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|eom|>", "<|eot|>", "<|finetune_right_pad|>",
    "<|header_start|>", "<|header_end|>", "<|image_start|>", "<|image_end|>", "<|image|>",
    "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|python_start|>", "<|python_end|>",
)  # fmt: skip


@dataclass(frozen=True)
class SpecialTokenIds:
    """The special token ids the serving path needs, for a given base vocabulary size."""

    bos: int
    eos: tuple[int, ...]
    """Stop tokens: <|end_of_text|>, <|eom|>, <|eot|> (generation_config's eos_token_id)."""
    pad: int
    eot: int
    header_start: int
    header_end: int
    image_start: int
    image_end: int
    image: int
    patch: int
    tile_x_separator: int
    tile_y_separator: int

    @classmethod
    def for_base_vocab(cls, base_vocab_size: int = REAL_BASE_VOCAB_SIZE) -> SpecialTokenIds:
        """Ids for a vocabulary whose special tokens start at `base_vocab_size`."""
        ids = special_token_ids(base_vocab_size)
        return cls(
            bos=ids["<|begin_of_text|>"],
            eos=(ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]),
            pad=ids["<|finetune_right_pad|>"],
            eot=ids["<|eot|>"],
            header_start=ids["<|header_start|>"],
            header_end=ids["<|header_end|>"],
            image_start=ids["<|image_start|>"],
            image_end=ids["<|image_end|>"],
            image=ids["<|image|>"],
            patch=ids["<|patch|>"],
            tile_x_separator=ids["<|tile_x_separator|>"],
            tile_y_separator=ids["<|tile_y_separator|>"],
        )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same as transformers: Jinja's own tojson HTML-escapes, which would corrupt prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(template: str) -> jinja2.Template:
    """Compile like transformers does (sandboxed, trim/lstrip blocks, loop controls), so our
    rendering and `apply_chat_template` produce the same text."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


_COMPILED: dict[str, jinja2.Template] = {}


def render_chat_prompt(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template: str = LLAMA4_CHAT_TEMPLATE,
    bos_token: str = BOS_TOKEN,
    **kwargs: Any,
) -> str:
    """Render a conversation with the Llama 4 instruct template (the prompt text, BOS included;
    encode it with `add_special_tokens=False`)."""
    compiled = _COMPILED.get(chat_template)
    if compiled is None:
        compiled = _COMPILED.setdefault(chat_template, _compile_template(chat_template))
    return compiled.render(
        messages=[dict(m) for m in messages],
        tools=None if tools is None else [dict(t) for t in tools],
        documents=None,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        **kwargs,
    )


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(
    out_dir: Path,
    base_vocab_size: int = DEFAULT_BASE_VOCAB_SIZE,
    num_special: int = DEFAULT_NUM_SPECIAL,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
    `transformers.AutoTokenizer`; byte-identical for identical arguments."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(base_vocab_size, num_special)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")

    ids = special_token_ids(base_vocab_size, num_special)
    config = {
        "added_tokens_decoder": {str(i): _added_token_entry(t) for t, i in ids.items()},
        "bos_token": BOS_TOKEN,
        "chat_template": LLAMA4_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _dump_json(out_dir / "tokenizer_config.json", config)
    special_map = {
        "bos_token": {k: v for k, v in _added_token_entry(BOS_TOKEN).items() if k != "special"},
        "eos_token": {k: v for k, v in _added_token_entry(EOS_TOKEN).items() if k != "special"},
        "pad_token": {k: v for k, v in _added_token_entry(PAD_TOKEN).items() if k != "special"},
    }
    _dump_json(out_dir / "special_tokens_map.json", special_map)
