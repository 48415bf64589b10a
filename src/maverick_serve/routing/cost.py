"""What a request costs and which cache blocks it could reuse, computed at the router.

Prompt tokens are exact (the router tokenizes and expands image layouts with the Llama 4 tiling
formula). Vision-encoder work is estimated from the model spec as text-token equivalents per
tile, so image-heavy requests weigh what they cost. Block keys use the engine's own chained
hashes (including image content hashes), truncated to 64 bits for compact indexes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.block_hashes import chain_block_hashes


def block_key(block_hash: bytes) -> int:
    """The 64-bit routing key of a block hash (engine and router agree on it)."""
    return int.from_bytes(block_hash[:8], "little")


def text_flops_per_token(spec: ModelSpec) -> float:
    t = spec.text
    attn = 2 * t.hidden_size * t.num_attention_heads * t.head_dim + 2 * t.hidden_size * (
        t.num_key_value_heads * t.head_dim
    )
    params = 0.0
    for layer in range(t.num_hidden_layers):
        ffn = (
            3 * t.hidden_size * t.intermediate_size * (t.num_experts_per_tok + 1)  # routed + shared
            if t.is_moe(layer)
            else 3 * t.hidden_size * t.intermediate_size_mlp
        )
        params += attn + ffn
    return 2 * params


def vision_flops_per_tile(spec: ModelSpec) -> float:
    v = spec.vision
    if v is None:
        return 0.0
    patches = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    return (
        2 * per_layer * v.num_hidden_layers * patches + 4 * v.num_hidden_layers * patches**2 * v.hidden_size
    )


@dataclass
class RequestCost:
    prompt_tokens: int
    image_tokens: int = 0
    image_tiles: int = 0
    vision_work: float = 0.0  # vision-encoder work in text-token equivalents
    block_keys: list[int] = field(default_factory=list)  # engine-block prefix chain
    tier_keys: list[int] = field(default_factory=list)  # KV-tier-block prefix chain
    session: str | None = None
    max_tokens: int = 0  # the client's max_tokens (0: not set, its decode time is unknown)

    @property
    def work(self) -> float:
        """Prefill work if nothing is cached, in text-token equivalents."""
        return self.prompt_tokens + self.vision_work

    @property
    def image_share(self) -> float:
        return (self.image_tokens + self.vision_work) / self.work if self.work else 0.0


class CostModel:
    def __init__(self, spec: ModelSpec, engine_block_size: int, tier_block_size: int) -> None:
        self.spec = spec
        self.engine_block_size = engine_block_size
        self.tier_block_size = tier_block_size
        text = text_flops_per_token(spec)
        self.vision_tokens_per_tile = vision_flops_per_tile(spec) / text if text else 0.0
        self.tokens_per_tile = spec.vision.tokens_per_tile if spec.vision is not None else 0

    def cost(
        self,
        prompt: list[int],
        image_hashes: list[str],
        session: str | None = None,
        with_tier: bool = True,
        max_tokens: int = 0,
    ) -> RequestCost:
        spans = self.image_spans(prompt, image_hashes)
        image_tokens = sum(e - s for s, e, _ in spans)
        patches = sum(prompt[s:e].count(self.spec.image_token_index) for s, e, _ in spans)
        tiles = -(-patches // self.tokens_per_tile) if self.tokens_per_tile else 0
        keys = [block_key(h) for h in chain_block_hashes(prompt, self.engine_block_size, [], spans)]
        tier = (
            [block_key(h) for h in chain_block_hashes(prompt, self.tier_block_size, [], spans)]
            if with_tier
            else []
        )
        return RequestCost(
            prompt_tokens=len(prompt),
            image_tokens=image_tokens,
            image_tiles=tiles,
            vision_work=tiles * self.vision_tokens_per_tile,
            block_keys=keys,
            tier_keys=tier,
            session=session,
            max_tokens=max_tokens,
        )

    def image_spans(self, prompt: list[int], image_hashes: list[str]) -> list[tuple[int, int, str]]:
        """(first patch, last patch + 1, hash) per image, as the engine computes them: the patches
        between the i-th `<|image_start|>` and its `<|image_end|>` belong to image i."""
        if not image_hashes:
            return []
        boi, eoi, patch = self.spec.boi_token_index, self.spec.eoi_token_index, self.spec.image_token_index
        spans: list[tuple[int, int, str]] = []
        first = last = -1
        inside = False
        for i, tok in enumerate(prompt):
            if tok == boi:
                inside, first, last = True, -1, -1
            elif tok == patch and inside:
                first = i if first < 0 else first
                last = i
            elif tok == eoi and inside:
                inside = False
                if first >= 0 and len(spans) < len(image_hashes):
                    spans.append((first, last + 1, image_hashes[len(spans)]))
        return spans
