"""OpenAI response shapes: envelopes, choices (message or delta), logprobs, usage, SSE frames."""

from __future__ import annotations

import json
import time
from typing import Any

from tokenizers import Tokenizer


class Choice:
    """Accumulates one choice's deltas."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None

    def apply(self, event: dict[str, Any]) -> None:
        self.text.append(event["text_delta"])
        self.token_ids.extend(event["new_token_ids"])
        self.logprobs.extend(event.get("logprobs") or [])
        if event["finished"]:
            self.finish_reason = event["finish_reason"]
            self.usage = event["usage"] or {}


def merge_events(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Two engine deltas of one choice as one: both texts and tokens, the later end state."""
    merged = {**first, **later}
    merged["text_delta"] = first["text_delta"] + later["text_delta"]
    merged["new_token_ids"] = [*first["new_token_ids"], *later["new_token_ids"]]
    if first.get("logprobs") or later.get("logprobs"):
        merged["logprobs"] = [*(first.get("logprobs") or []), *(later.get("logprobs") or [])]
    if "replica" in first:
        merged["replica"] = first["replica"]
    return merged


def _finite(logprob: float) -> float:
    """-inf (a token vLLM assigns no mass) and NaN are not JSON: clamped as vLLM's server does."""
    return logprob if logprob > _LOGPROB_FLOOR else _LOGPROB_FLOOR


_LOGPROB_FLOOR = -9999.0


class ResponseFormatter:
    def __init__(self, model_name: str, tokenizer: Tokenizer) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer

    def envelope(self, kind: str, rid: str, stream: bool) -> dict[str, Any]:
        """The fields every chat/completion response or chunk starts with."""
        if kind == "chat":
            obj = "chat.completion.chunk" if stream else "chat.completion"
            return {
                "id": f"chatcmpl-{rid}",
                "object": obj,
                "created": int(time.time()),
                "model": self.model_name,
            }
        return {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }

    def choice_body(
        self,
        kind: str,
        index: int,
        text: str,
        logprobs: list[dict[str, Any]] | None,
        finish_reason: str | None,
        delta: bool = False,
        text_offset: int = 0,
    ) -> dict[str, Any]:
        """One choice (or a stream chunk's delta of it). `text_offset`: where this text starts in
        the choice's whole text, so a stream's completion `text_offset`s go on from chunk to chunk
        as in the non-streamed answer."""
        if kind == "chat":
            lp = self.chat_logprobs(logprobs) if logprobs else None
            content = {
                "delta" if delta else "message": {"content": text}
                if delta
                else {"role": "assistant", "content": text}
            }
            return {"index": index, **content, "logprobs": lp, "finish_reason": finish_reason}
        lp = self.completion_logprobs(logprobs, text_offset) if logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, lps: list[dict[str, Any]]) -> dict[str, Any]:
        content = []
        for lp in lps:
            tok = self.token_text(lp["token_id"])
            content.append(
                {
                    "token": tok,
                    "logprob": _finite(lp["logprob"]),
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": (t := self.token_text(i)), "logprob": _finite(v), "bytes": list(t.encode())}
                        for i, v in lp["top"]
                    ],
                }
            )
        return {"content": content}

    def completion_logprobs(self, lps: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
        tokens = [self.token_text(lp["token_id"]) for lp in lps]
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(lp["logprob"]) for lp in lps],
            "top_logprobs": [{self.token_text(i): _finite(v) for i, v in lp["top"]} for lp in lps],
            "text_offset": offsets,
        }


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt = max((c.usage or {}).get("prompt_tokens", 0) for c in choices)
    completion = sum((c.usage or {}).get("completion_tokens", 0) for c in choices)
    cached = max((c.usage or {}).get("cached_tokens", 0) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse_data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def next_text_offset(body: dict[str, Any], offset: int) -> int:
    """Where the text after a completion choice body starts, from its logprobs' offsets."""
    lp = body.get("logprobs")
    if not lp or not lp.get("tokens") or "text_offset" not in lp:
        return offset
    return int(lp["text_offset"][-1]) + len(lp["tokens"][-1])
