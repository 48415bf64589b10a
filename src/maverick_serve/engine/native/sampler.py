"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators, logprobs."""

from __future__ import annotations

import torch

from maverick_serve.engine.types import SamplingParams, TokenLogprob


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, TokenLogprob | None]:
    """Pick one token from fp32 logits [vocab]. Logprobs are of the unmodified distribution."""
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        scaled = logits / params.temperature
        if params.top_k > 0 and params.top_k < scaled.numel():
            # Ranked on the logits: a huge temperature squeezes the scaled ones into ties.
            kth = torch.topk(logits, params.top_k).values[-1]
            scaled = scaled.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            drop = cum - sorted_probs >= params.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        try:
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        except RuntimeError:  # no finite mass left (extreme temperature): the likeliest token
            token = int(torch.argmax(logits))
    if params.logprobs is None:
        return token, None
    logp = torch.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        values, ids = torch.topk(logp, params.logprobs)
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return token, TokenLogprob(token_id=token, logprob=float(logp[token]), top=top)
