"""Our request and output types to and from vLLM's, field by field."""

from __future__ import annotations

from typing import Any

from vllm.sampling_params import RequestOutputKind
from vllm.sampling_params import SamplingParams as VllmSamplingParams

from maverick_serve.engine.types import FinishReason, SamplingParams, TokenLogprob

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def vllm_sampling(params: SamplingParams, max_tokens: int) -> VllmSamplingParams:
    """vLLM's sampling params for ours; `max_tokens` is what `check_request` resolved (a request
    without one fills the context, as on the native engine)."""
    return VllmSamplingParams(
        max_tokens=max_tokens,
        # Our greedy cut, not vLLM's (it lifts 0 < t < 0.01 to 0.01 and samples): both backends
        # answer a tiny temperature with the same greedy tokens.
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=0 if params.top_k in (0, -1) else params.top_k,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens,
        # Deltas, as our streams carry them: each output holds only what is new.
        output_kind=RequestOutputKind.DELTA,
    )


def finish_reason(reason: str | None) -> FinishReason | None:
    """vLLM's finish reason in our vocabulary ('error' and unknown ones end as 'abort')."""
    if reason is None:
        return None
    return _FINISH.get(reason, "abort")


def token_logprobs(token_ids: list[int], logprobs: Any, requested: int | None) -> list[TokenLogprob] | None:
    """Per new token: its logprob and the `requested` most likely alternatives, best first.
    `logprobs` is vLLM's list of {token id: Logprob} per token (we never ask for flat ones)."""
    if logprobs is None or requested is None:
        return None
    out = []
    for tok, entries in zip(token_ids, logprobs, strict=False):
        ranked = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= requested),
            key=lambda item: item[1].rank,
        )
        chosen = entries.get(tok)
        out.append(
            TokenLogprob(
                token_id=tok,
                logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                top=[(tid, float(lp.logprob)) for tid, lp in ranked][:requested],
            )
        )
    return out
