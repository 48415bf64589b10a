"""Per-request state the scheduler and runner share."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from maverick_serve.engine.block_hashes import chain_block_hashes
from maverick_serve.engine.native.detokenizer import IncrementalDetokenizer
from maverick_serve.engine.native.kv_cache import BlockTables
from maverick_serve.engine.types import EngineRequest, FinishReason, RequestTiming, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: EngineRequest
    max_tokens: int
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    patch_positions: torch.Tensor  # prompt positions of <|patch|> tokens, in image order
    image_spans: list[tuple[int, int, str]]  # (start, end, content hash) per image
    detokenizer: IncrementalDetokenizer
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_prompt: int = 0
    admitted: bool = False
    blocks: BlockTables = field(default_factory=BlockTables)
    block_hashes: list[bytes] = field(default_factory=list)
    image_features: torch.Tensor | None = None
    text: str = ""
    emitted_text_len: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_emitted_tokens: int = 0
    tier_hashes: list[bytes] | None = None  # KV-tier block hashes of the prompt
    tier_stored: int = 0  # global-layer tier blocks already queued for storing
    tier_chunked_stored: bool = False
    timing: RequestTiming = field(default_factory=lambda: RequestTiming(arrival=0.0))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def update_block_hashes(self, block_size: int) -> list[bytes]:
        self.block_hashes = chain_block_hashes(
            self.all_token_ids, block_size, self.block_hashes, self.image_spans
        )
        return self.block_hashes
