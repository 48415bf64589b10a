"""The chaos tier's load and counting: clients that stream greedy chat requests back to back while
one fault hits, each request counted by how it ended.

- ok: `[DONE]` with the fault-free run's text;
- retried: failed before its first token (5xx, connection cut) and succeeded on a client retry, as
  the OpenAI client retries; a router-side retry before the first token counts here too
  (`x-maverick-retries`);
- broken: cut after its first token, by an error event (the router alive to send one) or a
  connection cut (the router replica itself died: Serve's proxy drops the connection mid-body);
  never silent: a clean end without `[DONE]` counts apart and must not happen;
- failed: never succeeded before its first token within `ATTEMPTS` attempts;
- hung: no end within its deadline;
- wrong: finished with a text that differs from the fault-free run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import ray
from ray import serve

MAX_TOKENS = 24
DEADLINE_S = 90.0  # per request, retries included
FAULT_AT_S = 5.0
ATTEMPTS = 4
KINDS = ["ok", "retried", "broken", "broken: error event", "broken: connection cut", "broken: silent"]
KINDS += ["failed", "hung", "wrong"]


@dataclass
class Outcome:
    kind: str  # ok | retried | broken | failed | hung | wrong
    how: str = ""  # of a broken one: error event | connection cut | silent


class BeforeFirstToken(Exception):
    pass


class Load:
    """One app under load: where it is, what it answers fault-free, what served the streams."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.reference: dict[str, str] = {}
        self.served_by: Counter[str] = Counter()  # engine replica id → streams (x-maverick-replica)
        self.prefill: Counter[str] = Counter()  # hand-off outcome → requests (x-maverick-prefill)

    async def stream_once(self, client: httpx.AsyncClient, prompt: str) -> tuple[str, bool, int, str]:
        """One attempt: (text, finished with [DONE], router retries, how it broke if it did).
        Raises BeforeFirstToken when it failed before any token arrived."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text, first = "", False
        try:
            async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise BeforeFirstToken(f"{r.status_code}: {r.text[:200]}")
                retries = int(r.headers.get("x-maverick-retries", "0"))
                self.served_by[r.headers.get("x-maverick-replica", "")] += 1
                if "x-maverick-prefill" in r.headers:
                    self.prefill[r.headers["x-maverick-prefill"]] += 1
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return text, True, retries, ""
                    event = json.loads(data)
                    if "error" in event:
                        if not first:
                            raise BeforeFirstToken(event["error"]["message"])
                        return text, False, retries, "error event"
                    choices = event["choices"]  # the usage chunk has none
                    delta = (choices[0]["delta"].get("content") or "") if choices else ""
                    first = first or bool(delta)
                    text += delta
        except httpx.TransportError as exc:
            if not first:
                raise BeforeFirstToken(repr(exc)) from exc
            return text, False, 0, "connection cut"
        if not first:
            raise BeforeFirstToken("stream ended before its first token")
        return text, False, 0, "silent"

    async def record_reference(self, prompts: list[str]) -> None:
        """The fault-free run's text per prompt."""
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            for p in prompts:
                text, done, _, _ = await self.stream_once(client, p)
                assert done and text, p
                self.reference[p] = text

    async def request(self, client: httpx.AsyncClient, prompt: str) -> Outcome:
        retried = False
        for attempt in range(ATTEMPTS):
            try:
                text, done, router_retries, how = await self.stream_once(client, prompt)
            except BeforeFirstToken:
                retried = True
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if not done:
                return Outcome("broken", how)
            if text != self.reference.get(prompt, text):
                return Outcome("wrong")
            return Outcome("retried" if retried or router_retries else "ok")
        return Outcome("failed")

    async def run(self, prompts: list[str], seconds: float, fault: Callable[[], None] | None) -> Counter[str]:
        """One client per prompt, back to back for `seconds`; `fault` runs FAULT_AT_S in."""
        counts: Counter[str] = Counter()
        stop = time.monotonic() + seconds

        async def client_loop(prompt: str) -> None:
            async with httpx.AsyncClient(timeout=httpx.Timeout(DEADLINE_S, connect=10)) as client:
                while time.monotonic() < stop:
                    try:
                        outcome = await asyncio.wait_for(self.request(client, prompt), DEADLINE_S)
                    except TimeoutError:
                        outcome = Outcome("hung")
                    counts[outcome.kind] += 1
                    if outcome.kind == "broken":
                        counts[f"broken: {outcome.how}"] += 1

        async def injector() -> None:
            if fault is not None:
                await asyncio.sleep(FAULT_AT_S)
                await asyncio.to_thread(fault)

        await asyncio.gather(injector(), *(client_loop(p) for p in prompts))
        return counts


def replica_actors(app: str, deployment: str) -> list[str]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return sorted(n for n in names if f"{app}#{deployment}#" in n)


def wait_replicas(app: str, deployment: str, count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[app].deployments[deployment]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) == count:
            return
        time.sleep(1)
    raise AssertionError(f"{deployment} did not get back to {count} running replicas in {timeout_s} s")


def run_fault(
    load: Load,
    prompts: list[str],
    seconds: float,
    name: str,
    inject: Callable[[], None],
    heal: Callable[[], None],
    table: dict[str, Counter[str]],
) -> Counter[str]:
    """The load through one fault, then `heal` (back to the fault-free shape for the next one);
    the counts join `table`, which is printed."""
    counts = asyncio.run(load.run(prompts, seconds, inject))
    heal()
    table[name] = counts
    print_table(table)
    return counts


def print_table(table: dict[str, Counter[str]]) -> None:
    print(f"\n{'fault':<40}" + "".join(f"{k:>{len(k) + 2}}" for k in KINDS))
    for name, c in table.items():
        print(f"{name:<40}" + "".join(f"{c[k]:>{len(k) + 2}}" for k in KINDS))


def assert_bounds(counts: Counter[str], clients: int, broken_end: str | None) -> None:
    """None hung, wrong, failed or silent; the load kept going; broken streams (where the fault
    may break any: `broken_end` is how they must end) ended that way, else none broke."""
    served = counts["ok"] + counts["retried"]
    assert served >= clients, counts  # the load kept going through the fault
    assert counts["hung"] == 0 and counts["wrong"] == 0 and counts["failed"] == 0, counts
    if broken_end is None:
        assert counts["broken"] == 0, counts
    else:  # the killed replica had work in flight, or the test proved nothing
        assert counts["broken"] + counts["retried"] > 0, counts
        assert counts["broken: silent"] == 0, counts
        assert counts[f"broken: {broken_end}"] == counts["broken"], counts
