"""A running app answers: GET /v1/models lists the model, one 1-token chat completion succeeds.

The `helm test` pod runs it against the release's Service; tests/helm runs the same module
against the chart's rendered Serve config deployed on a local Ray.
    python -m maverick_serve.serving.smoke_check --url http://host:8000 --model llama-4-tiny
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx


def check(url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0) -> list[str]:
    """Problems found (empty: healthy)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    problems = []
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as http:
        try:
            models = http.get("/v1/models")
            chat = http.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
            )
        except httpx.HTTPError as exc:
            return [f"{url} unreachable: {exc}"]
    if models.status_code != 200:
        problems.append(f"GET /v1/models answered {models.status_code}: {models.text[:200]}")
    elif model not in [m.get("id") for m in models.json().get("data", [])]:
        problems.append(f"GET /v1/models does not list {model}: {models.text[:200]}")
    if chat.status_code != 200:
        problems.append(f"POST /v1/chat/completions answered {chat.status_code}: {chat.text[:200]}")
    else:
        body = chat.json()
        usage = body.get("usage") or {}
        if not body.get("choices") or usage.get("completion_tokens") != 1:
            problems.append(f"the chat completion is not one generated token: {chat.text[:200]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the API (no /v1)")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--api-key-env", default=None, help="environment variable holding an API key")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args(argv)
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        print(f"smoke check: {args.api_key_env} is not set", file=sys.stderr)
        return 2
    problems = check(args.url, args.model, key, args.timeout)
    for p in problems:
        print(f"smoke check: {p}", file=sys.stderr)
    if not problems:
        print(f"smoke check: {args.url} serves {args.model}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
