"""Router pieces without engines: block index, hub, cluster view, policies, cost, API keys."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from maverick_serve.api.errors import APIError
from maverick_serve.config import preset
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.routing import AuthConfig, RoutingConfig
from maverick_serve.engine.block_hashes import chain_block_hashes
from maverick_serve.routing.admission import Admission, predicted_wait_s, retry_after
from maverick_serve.routing.auth import ApiKeyAuth, hash_key
from maverick_serve.routing.cost import CostModel, RequestCost, block_key
from maverick_serve.routing.hub import ReplicaStateHub
from maverick_serve.routing.policy import make_policy
from maverick_serve.routing.state import BlockIndex, ClusterView


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_block_index_prefix_lengths_per_replica() -> None:
    index = BlockIndex(capacity=100)
    index.add([1, 2, 3, 4], 0b01)
    index.add([1, 2], 0b10)
    index.add([9], 0b100)
    assert index.prefix_blocks([1, 2, 3, 4, 5], 0b111) == {0b01: 4, 0b10: 2, 0b100: 0}
    index.remove([2], 0b01)  # evicted on replica 0: its prefix now stops at block 1
    assert index.prefix_blocks([1, 2, 3], 0b011) == {0b01: 1, 0b10: 2}
    index.add(range(1000, 1200), 0b1)
    assert len(index) == 100 and 1 not in index.masks  # bounded, oldest first


def _report(
    replica: str, stored: list[int] = (), evicted: list[int] = (), reset: bool = False, **load: int
) -> dict:  # type: ignore[assignment]
    return {
        "replica": replica,
        "reset": reset,
        "load": {"waiting": 0, "running": 0, "queued_prefill_tokens": 0, **load},
        "stored": stored or [],
        "evicted": evicted or [],
        "tier_stored": [],
        "tier_shared": True,
    }


def test_hub_cursor_snapshot_restart_and_expiry() -> None:
    clock = Clock()
    hub = ReplicaStateHub(max_log=3, expiry_s=5.0, clock=clock)
    assert hub.publish(_report("a", [1, 2]))["need_reset"]  # unknown replica: send a snapshot
    hub.publish(_report("a", [1, 2], reset=True))
    hub.publish(_report("b", [7], reset=True, waiting=3))
    view = ClusterView(RoutingConfig(), clock=clock)
    view.apply(hub.poll(None, 0))  # new router: snapshot
    assert view.local.prefix_blocks([1, 2], 0b11) == {view.replicas["a"].bit: 2, view.replicas["b"].bit: 0}
    assert view.replicas["b"].load.waiting == 3
    hub.publish(_report("a", [3], evicted=[1]))
    update = hub.poll(view.epoch, view.cursor)
    assert not update["snapshot"] and [e["stored"] for e in update["events"]] == [[3]]
    view.apply(update)
    assert view.local.prefix_blocks([1], view.replicas["a"].bit) == {view.replicas["a"].bit: 0}
    for i in range(5):  # the log holds 3 entries: a lagging router gets a snapshot
        hub.publish(_report("b", [100 + i]))
    assert hub.poll(view.epoch, view.cursor)["snapshot"]
    assert hub.poll("another-epoch", hub.seq)["snapshot"]  # a restarted hub is noticed
    clock.t += 6  # nobody reported: both expire, and routers forget them
    view.apply(hub.poll(view.epoch, hub.seq))
    assert view.replicas == {} and view.alive() == []


def test_the_newest_load_wins_whether_it_came_from_the_hub_or_a_streams_first_event() -> None:
    clock = Clock()
    hub = ReplicaStateHub(clock=clock)
    hub.publish(_report("a", [1], reset=True, running=2, at=10))
    view = ClusterView(RoutingConfig(), clock=clock)
    view.apply(hub.poll(None, 0))
    assert view.replicas["a"].load.running == 2
    # The first event of a stream this router sent: newer than the hub's, taken at once.
    view.observe_load("a", {"waiting": 0, "running": 3, "queued_prefill_tokens": 0, "at": 11.0})
    assert view.replicas["a"].load.running == 3
    # The hub's answer still carries the report of t=10: older, so it does not undo the 3.
    view.apply(hub.poll(view.epoch, view.cursor))
    assert view.replicas["a"].load.running == 3
    hub.publish(_report("a", running=1, at=12))  # a newer report through the hub replaces it
    view.apply(hub.poll(view.epoch, view.cursor))
    assert view.replicas["a"].load.running == 1
    view.observe_load("a", {"running": 9, "at": 11.5})  # late and older: ignored
    view.observe_load("ghost", {"running": 9, "at": 99.0})  # not announced by the hub: ignored
    view.observe_load("a", None)  # a first event without a load (an error event)
    assert view.replicas["a"].load.running == 1 and set(view.replicas) == {"a"}
    # The replica restarted (a snapshot report): its new process's stamps start over.
    hub.publish(_report("a", [2], reset=True, running=4, at=0.5))
    view.apply(hub.poll(view.epoch, view.cursor))
    assert view.replicas["a"].load.running == 4


def _view(clock: Clock, loads: dict[str, dict[str, int]], cached: dict[str, list[int]]) -> ClusterView:
    hub = ReplicaStateHub(clock=clock)
    for name, load in loads.items():
        hub.publish(_report(name, cached.get(name, []), reset=True, **load))
    view = ClusterView(RoutingConfig(max_queue_per_replica=4), clock=clock)
    view.apply(hub.poll(None, 0))
    return view


def _choose(policy: Any, view: ClusterView, cost: RequestCost) -> Any:
    """What the dispatcher does: the policy ranks the replicas admission lets through."""
    admission = Admission(view.cfg)
    candidates = [e for e in view.alive() if admission.verdict(e, cost, 1, 600.0).admit]
    return policy.choose(view, cost, candidates) if candidates else None


def test_a_replica_leaving_the_hub_is_dropped_by_routers_with_its_cache_entries() -> None:
    clock = Clock()
    hub = ReplicaStateHub(expiry_s=60.0, clock=clock)
    hub.publish(_report("a", [1, 2], reset=True))
    hub.publish(_report("b", [1], reset=True))
    view = ClusterView(RoutingConfig(), clock=clock)
    view.apply(hub.poll(None, 0))
    b_bit = view.replicas["b"].bit
    hub.leave("a")  # scale-down drained it: gone at once, not after expiry_s
    view.apply(hub.poll(view.epoch, view.cursor))
    assert set(view.replicas) == {"b"}
    blocks = view.local.prefix_blocks([1, 2], 0b11)
    assert blocks[b_bit] == 1 and sum(blocks.values()) == 1  # a's cached blocks left with it


def test_policies_rank_by_their_scorers() -> None:
    clock = Clock()
    loads = {"a": {"waiting": 3, "queued_prefill_tokens": 3000}, "b": {}, "c": {"waiting": 4}}
    view = _view(clock, loads, {"a": [10, 11, 12, 13]})
    cost = RequestCost(prompt_tokens=80, block_keys=[10, 11, 12, 13, 14])
    cache = make_policy(RoutingConfig(policy="cache_aware"), engine_block=16, tier_block=256)
    decision = _choose(cache, view, cost)
    assert decision is not None and decision.ranked[0] == "a" and decision.reason == "prefix"
    assert decision.predicted_hit_tokens == 64 and "c" not in decision.ranked  # c's queue is full
    least = _choose(make_policy(RoutingConfig(policy="least_load"), 16, 256), view, cost)
    assert least is not None and least.ranked == ["b", "a"]
    rr = make_policy(RoutingConfig(policy="round_robin"), 16, 256)
    firsts = [d.ranked[0] for d in (_choose(rr, view, cost), _choose(rr, view, cost)) if d]
    assert sorted(firsts) == ["a", "b"]
    view.replicas["a"].load.waiting = 4
    view.replicas["b"].load.waiting = 4
    assert _choose(cache, view, cost) is None  # every live replica full → the router answers 429


def test_session_stickiness_and_image_spreading() -> None:
    clock = Clock()
    view = _view(clock, {"a": {}, "b": {}}, {})
    policy = make_policy(RoutingConfig(policy="multimodal_cache_aware"), 16, 256)
    first = _choose(policy, view, RequestCost(prompt_tokens=40, session="user-1"))
    assert first is not None
    again = _choose(policy, view, RequestCost(prompt_tokens=40, session="user-1"))
    assert again is not None and again.ranked[0] == first.ranked[0] and again.reason == "session"
    images = RequestCost(prompt_tokens=1200, image_tokens=1100, image_tiles=7, vision_work=200)
    picks = []
    for _ in range(6):
        d = _choose(policy, view, images)
        assert d is not None
        picks.append(d.ranked[0])
        view.on_sent(d.ranked[0], images.work, images.image_tokens + images.vision_work)
    assert picks.count("a") == picks.count("b") == 3


def test_unknown_policy_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(ValidationError, match=r"router\.routing\.policy"):
        ClusterConfig.model_validate({"router": {"routing": {"policy": "fastest"}}})


def test_router_block_keys_equal_the_engines_including_images() -> None:
    spec = preset("tiny")
    costs = CostModel(spec, engine_block_size=16, tier_block_size=64)
    patch, boi, eoi = spec.image_token_index, spec.boi_token_index, spec.eoi_token_index
    prompt = [5] * 20 + [boi] + [patch] * 30 + [7, patch, patch] + [eoi] + [9] * 40
    cost = costs.cost(prompt, ["img-hash"], session=None)
    first, last = 21, 21 + 30 + 3  # the engine's span: first to last patch of the image
    engine = chain_block_hashes(prompt, 16, [], [(first, last, "img-hash")])
    assert cost.block_keys == [block_key(h) for h in engine]
    assert cost.image_tokens == last - first and cost.vision_work > 0
    other = costs.cost(prompt, ["another-image"], session=None)
    assert other.block_keys[0] == cost.block_keys[0] and other.block_keys[2] != cost.block_keys[2]


def test_api_keys_hashed_from_config_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keys.json").write_text(json.dumps([{"name": "file", "sha256": hash_key("k-file")}]))
    monkeypatch.setenv("MV_KEYS", json.dumps([{"name": "env", "sha256": hash_key("k-env")}]))
    cfg = AuthConfig(
        enabled=True,
        keys=[{"name": "inline", "sha256": hash_key("k-inline"), "requests_per_min": 2}],  # type: ignore[list-item]
        keys_file=tmp_path / "keys.json",
        keys_env="MV_KEYS",
    )
    clock = Clock()
    auth = ApiKeyAuth(cfg, clock=clock)
    assert {auth.authenticate(f"Bearer {k}").name for k in ("k-file", "k-env", "k-inline")} == {  # type: ignore[union-attr]
        "file",
        "env",
        "inline",
    }
    for header, code in (
        (None, "missing_api_key"),
        ("Bearer nope", "invalid_api_key"),
        ("Basic x", "missing_api_key"),
    ):
        with pytest.raises(APIError) as info:
            auth.authenticate(header)
        assert info.value.status == 401 and info.value.code == code
    state = auth.authenticate("Bearer k-inline")
    auth.admit(state, 10)
    auth.admit(state, 10)
    with pytest.raises(APIError) as info:
        auth.admit(state, 10)  # third request within the minute
    assert info.value.status == 429 and info.value.headers["retry-after"] == "30"
    clock.t += 30
    auth.admit(state, 10)
    with pytest.raises(APIError, match="allows 2000000 tokens per minute"):
        auth.admit(auth.authenticate("Bearer k-env"), 3_000_000)
    with pytest.raises(ValueError, match=r"auth\.keys_env names 'NOPE'"):
        ApiKeyAuth(AuthConfig(enabled=True, keys_env="NOPE"))
    with pytest.raises(ValueError, match="no keys are configured"):
        ApiKeyAuth(AuthConfig(enabled=True))


def test_router_answers_401_and_429_over_http(tiny_model: Path) -> None:
    from maverick_serve.serving.engine_server import EngineServer
    from maverick_serve.serving.local_replicas import LocalEngineClient
    from maverick_serve.serving.router_server import RouterServer

    cfg = ClusterConfig.model_validate(
        {
            "model": {"path": str(tiny_model), "served_model_name": "m"},
            "engine": {"kv_cache_memory_gib": 0.05},
            "router": {
                "auth": {
                    "enabled": True,
                    "keys": [{"name": "team-a", "sha256": hash_key("secret-a"), "tokens_per_min": 100}],
                }
            },
        }
    ).model_dump(mode="json")
    server = EngineServer(cfg)
    router = RouterServer(cfg, LocalEngineClient(server))

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=router.build_api())
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            body: dict[str, Any] = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}
            out = [await client.post("/v1/completions", json=body)]
            out.append(
                await client.post("/v1/completions", json=body, headers={"authorization": "Bearer bad"})
            )
            ok = {"authorization": "Bearer secret-a"}
            out.append(await client.post("/v1/completions", json=body, headers=ok))
            out.append(await client.post("/v1/completions", json=body | {"max_tokens": 200}, headers=ok))
            out.append(await client.get("/health"))  # liveness needs no key
            return out

    try:
        missing, wrong, ok, over, health = asyncio.new_event_loop().run_until_complete(calls())
    finally:
        server.shutdown()
    assert missing.status_code == 401 and missing.json()["error"]["param"] == "authorization"
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert ok.status_code == 200
    assert over.status_code == 429 and "allows 100 tokens per minute" in over.json()["error"]["message"]
    assert health.status_code == 200


def test_bench_router_decision_latency_indexes_every_block() -> None:
    from maverick_serve.bench.router_bench import decision_latency

    p50, p99, keys = decision_latency(replicas=8, blocks_per_replica=2000, trials=200)
    assert keys == 16_000 and 0 < p50 <= p99


def test_a_full_tier_waits_for_starting_replicas_instead_of_429() -> None:
    from maverick_serve.model.image_processing import ImageProcessingConfig
    from maverick_serve.routing.dispatcher import Dispatcher

    cfg = ClusterConfig.model_validate(
        {"router": {"routing": {"max_queue_per_replica": 4, "scale_up_wait_s": 0.6, "state_interval_s": 0.1}}}
    )
    starting = [True]
    dispatcher = Dispatcher(
        cfg, preset("tiny"), None, None, ImageProcessingConfig(), capacity_coming=lambda: starting[0]
    )  # type: ignore[arg-type]
    hub = ReplicaStateHub()
    hub.publish(_report("a", reset=True, waiting=4))  # the only replica is full
    dispatcher.view.apply(hub.poll(None, 0))
    cost = dispatcher.price([1, 2, 3], [], None)

    async def joins_later() -> str:
        async def new_replica() -> None:
            await asyncio.sleep(0.3)
            hub.publish(_report("b", reset=True))  # the replica the autoscaler asked for is up
            dispatcher.view.apply(hub.poll(dispatcher.view.epoch, dispatcher.view.cursor))

        task = asyncio.create_task(new_replica())
        decision = await dispatcher.choose_or_wait(cost)
        await task
        return decision.ranked[0]

    assert asyncio.run(joins_later()) == "b"
    hub.publish(_report("b", waiting=4))
    dispatcher.view.apply(hub.poll(dispatcher.view.epoch, dispatcher.view.cursor))
    start = asyncio.run(_timed(dispatcher, cost))  # still starting, none joins: 429 after the wait
    assert 0.5 <= start < 2.0
    starting[0] = False
    assert asyncio.run(_timed(dispatcher, cost)) < 0.1  # nothing starting: 429 at once


async def _timed(dispatcher: Any, cost: Any) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(APIError) as err:
        await dispatcher.choose_or_wait(cost)
    assert err.value.status == 429
    return loop.time() - t0


def test_no_live_replica_is_a_503_and_a_full_tier_a_429() -> None:
    from maverick_serve.model.image_processing import ImageProcessingConfig
    from maverick_serve.routing.dispatcher import Dispatcher

    cfg = ClusterConfig.model_validate({"router": {"routing": {"max_queue_per_replica": 4}}})
    dispatcher = Dispatcher(cfg, preset("tiny"), None, None, ImageProcessingConfig())  # type: ignore[arg-type]
    hub = ReplicaStateHub()
    hub.publish(_report("a", reset=True, waiting=4))
    dispatcher.view.apply(hub.poll(None, 0))
    cost = dispatcher.price([1, 2, 3], [], None)
    with pytest.raises(APIError) as full:
        dispatcher.choose(cost)
    assert full.value.status == 429 and full.value.code == "overloaded"
    dispatcher.view.mark_failed("a")  # its engine died: the router saw the stream fail
    with pytest.raises(APIError) as down:
        dispatcher.choose(cost)
    assert down.value.status == 503 and down.value.code == "unavailable"
    assert "no engine replica is up (1 failed or stopped reporting)" in str(down.value)
    assert down.value.headers["retry-after"]


def test_a_silent_hub_falls_back_to_serves_choice_not_503() -> None:
    """Found by tests/chaos: with the state hub dead, every replica's state went stale and the
    router answered 503 for replicas that were serving fine."""
    from maverick_serve.model.image_processing import ImageProcessingConfig
    from maverick_serve.routing.dispatcher import Dispatcher

    cfg = ClusterConfig.model_validate({"router": {"routing": {"state_expiry_s": 2.0}}})
    channel = object()  # never polled here: the view below is what the last good poll brought
    dispatcher = Dispatcher(cfg, preset("tiny"), None, channel, ImageProcessingConfig())  # type: ignore[arg-type]
    hub = ReplicaStateHub()
    hub.publish(_report("a", reset=True))
    dispatcher.view.apply(hub.poll(None, 0))
    dispatcher._polled_at = time.monotonic()
    cost = dispatcher.price([1, 2, 3], [], None)
    assert dispatcher.choose(cost).ranked == ["a"]
    dispatcher.view.mark_failed("a")
    with pytest.raises(APIError):  # the hub answers and says the replica is gone: 503
        dispatcher.choose(cost)
    dispatcher._polled_at = time.monotonic() - 3.0  # the hub has not answered for > state_expiry_s
    decision = dispatcher.choose(cost)
    assert decision.ranked == [] and decision.reason == "no_state"


def _measured(**load: float) -> dict[str, float]:
    """A replica that measured 1000 prompt tokens/s, 20 ms steps and 4 finished/s."""
    return {"max_num_seqs": 8, "prefill_tokens_per_s": 1000.0, "step_s": 0.02, "finished_per_s": 4.0, **load}


def test_admission_predicts_the_wait_from_queued_tokens_and_seats() -> None:
    clock = Clock()
    view = _view(clock, {"a": _measured(queued_prefill_tokens=2000, running=8, waiting=3)}, {})
    a = view.replicas["a"]
    # 2000 tokens at 1000/s, then 3 waiting + itself = 4 requests must leave at 4/s
    assert predicted_wait_s(a) == pytest.approx(2.0 + 1.0)
    view.on_sent("a", 500.0, 0.0)  # sent by this router, not yet reported: counted too
    assert predicted_wait_s(a) == pytest.approx(2.5 + 1.25)
    cold = _view(clock, {"b": {"waiting": 3, "queued_prefill_tokens": 2000}}, {})
    assert predicted_wait_s(cold.replicas["b"]) is None  # nothing measured yet: no prediction


def test_admission_admits_within_the_deadline_and_refuses_past_it() -> None:
    clock = Clock()
    cfg = RoutingConfig(
        max_queue_per_replica=100, max_queued_tokens_per_replica=50_000, deadline_headroom=1.0
    )
    view = ClusterView(cfg, clock=clock)
    hub = ReplicaStateHub(clock=clock)
    hub.publish(_report("a", reset=True, **_measured(queued_prefill_tokens=4000, running=8, waiting=6)))
    hub.publish(_report("idle", reset=True, **_measured()))
    view.apply(hub.poll(None, 0))
    admission = Admission(cfg)
    busy, idle = view.replicas["a"], view.replicas["idle"]
    cost = RequestCost(prompt_tokens=1000, max_tokens=50)  # own run: 1 s prefill + 50 × 20 ms
    wait = 4.0 + 7 / 4.0
    assert admission.verdict(busy, cost, 1, budget_s=wait + 2.0 + 0.01).admit
    halved = Admission(cfg.model_copy(update={"deadline_headroom": 0.5}))
    assert not halved.verdict(busy, cost, 1, budget_s=wait + 2.0 + 0.01).admit  # half the time left
    refused = admission.verdict(busy, cost, 1, budget_s=wait + 2.0 - 1.5)
    assert not refused.admit and refused.reason == "deadline"
    assert refused.retry_after_s == pytest.approx(1.5)  # the queue drains in real time
    assert retry_after([refused], default_s=1) == 2  # whole seconds, rounded up
    # An idle replica admits whatever the budget: alone is the best it can do.
    assert admission.verdict(idle, cost, 1, budget_s=0.1).admit
    # Memory bounds hold without any prediction.
    many = admission.verdict(busy, cost, 95, budget_s=1e9)
    assert not many.admit and many.reason == "queue_full"
    assert many.retry_after_s == pytest.approx((6 + 95 - 100) / 4.0)
    huge = admission.verdict(busy, RequestCost(prompt_tokens=46_001), 1, budget_s=1e9)
    assert not huge.admit and huge.reason == "tokens_full"
    assert admission.verdict(idle, RequestCost(prompt_tokens=10_000_000), 1, budget_s=1e9).admit
    off = Admission(cfg.model_copy(update={"admit_by_predicted_wait": False}))
    assert off.verdict(busy, cost, 1, budget_s=0.1).admit  # bounds only
    assert retry_after([], default_s=3) == 3


def test_the_dispatcher_answers_429_naming_the_deadline_and_retry_after() -> None:
    from maverick_serve.model.image_processing import ImageProcessingConfig
    from maverick_serve.routing.dispatcher import Dispatcher

    cfg = ClusterConfig.model_validate(
        {"router": {"request_timeout_s": 5.0, "routing": {"deadline_headroom": 1.0}}}
    )
    dispatcher = Dispatcher(cfg, preset("tiny"), None, None, ImageProcessingConfig())  # type: ignore[arg-type]
    hub = ReplicaStateHub()
    hub.publish(_report("a", reset=True, **_measured(queued_prefill_tokens=9000, running=8, waiting=40)))
    hub.publish(_report("b", reset=True, **_measured(queued_prefill_tokens=3000, running=8, waiting=10)))
    dispatcher.view.apply(hub.poll(None, 0))
    cost = dispatcher.price([1, 2, 3], [], None, max_tokens=10)
    with pytest.raises(APIError) as err:
        dispatcher.choose(cost)
    assert err.value.status == 429 and err.value.code == "overloaded"
    assert "shortest predicted queue wait 5.8 s, 5.0 s left of router.request_timeout_s=5" in str(err.value)
    # b: 3 s + 11/4 s wait + 3 ms + 0.2 s own run, 5 s left → about 1 s to drain
    assert err.value.headers["retry-after"] == "1"
    assert dispatcher.choose(cost, budget_s=6.0).ranked == ["b"]  # a longer deadline fits b only
    # Before the prompt is built: refused on the queues alone, with the same answer.
    with pytest.raises(APIError) as early:
        dispatcher.refuse_early(10, 1)
    assert early.value.status == 429 and early.value.headers["retry-after"] == "1"
    assert dispatcher.metrics.stats.rejections["all_replicas_full"] == 1


def test_the_early_refusal_never_refuses_what_choose_would_admit() -> None:
    from maverick_serve.model.image_processing import ImageProcessingConfig
    from maverick_serve.routing.dispatcher import Dispatcher

    cfg = ClusterConfig.model_validate({"router": {"request_timeout_s": 5.0}})
    dispatcher = Dispatcher(cfg, preset("tiny"), None, None, ImageProcessingConfig())  # type: ignore[arg-type]
    dispatcher.refuse_early(10, 1)  # no replica state yet: Serve's choice, nothing refused
    hub = ReplicaStateHub()
    hub.publish(_report("a", reset=True, **_measured(queued_prefill_tokens=2000, running=8, waiting=4)))
    dispatcher.view.apply(hub.poll(None, 0))
    dispatcher.refuse_early(10, 1)  # 2 s + 1.25 s of queue fits 5 s: let the prompt be built
    assert dispatcher.choose(dispatcher.price([1, 2, 3], [], None, max_tokens=10)).ranked == ["a"]


def test_merged_engine_events_keep_every_token_and_the_last_end_state() -> None:
    from maverick_serve.serving.openai_format import merge_events

    first = {
        "text_delta": "a",
        "new_token_ids": [1],
        "logprobs": None,
        "finished": False,
        "finish_reason": None,
        "usage": None,
        "replica": "r1",
    }
    later = {
        "text_delta": "bc",
        "new_token_ids": [2, 3],
        "logprobs": [{"t": 2}],
        "finished": True,
        "finish_reason": "length",
        "usage": {"completion_tokens": 3},
    }
    merged = merge_events(first, later)
    assert merged["text_delta"] == "abc" and merged["new_token_ids"] == [1, 2, 3]
    assert merged["logprobs"] == [{"t": 2}] and merged["replica"] == "r1"
    assert merged["finished"] and merged["finish_reason"] == "length"
    assert merged["usage"] == {"completion_tokens": 3} and first["text_delta"] == "a"


def test_engine_rates_for_admission_come_from_step_times() -> None:
    from maverick_serve.engine.native.step_rates import StepRecord, measured_rates

    # (end time, prompt tokens, generated tokens, step seconds, finished) per step
    prefills = [StepRecord(10.0 + 0.1 * i, 300, 2, 0.05, 0) for i in range(10)]
    decodes = [StepRecord(11.0 + 0.1 * i, 0, 16, 0.02, i % 2) for i in range(20)]
    rates = measured_rates(tuple(prefills + decodes))
    assert rates["prefill_tokens_per_s"] == pytest.approx(300 / 0.05)  # of the steps that prefilled
    assert rates["step_s"] == pytest.approx((0.5 + 0.4) / 30)
    assert rates["finished_per_s"] == pytest.approx(10 / 0.9)  # per second of step time
    assert measured_rates(tuple(decodes[:5]))["step_s"] == 0.0  # 0.1 s of steps: not yet measured


def test_load_reports_refit_the_rates_once_per_refit_interval_and_keep_counts_exact(tiny_model: Path) -> None:
    from maverick_serve.config import NativeEngineConfig
    from maverick_serve.engine.native.engine import _REFIT_S, NativeEngine
    from maverick_serve.engine.native.step_rates import StepRecord
    from maverick_serve.engine.types import EngineRequest, SamplingParams

    engine = NativeEngine.from_pretrained(tiny_model, NativeEngineConfig(kv_cache_memory_gib=0.05))
    assert engine.load_report()["step_s"] == 0.0  # nothing measured yet
    for i in range(30):
        engine._record_rate(StepRecord(100.0 + 0.01 * i, 0, 16, 0.02, 0))
    fitted = engine.load_report()
    assert fitted["step_s"] == pytest.approx(0.02)
    # Slower steps within the refit interval: the fitted rates stay (a load report per request
    # must not refit the window each time) ...
    engine._record_rate(StepRecord(100.29 + _REFIT_S / 2, 0, 16, 0.2, 0))
    engine.add_request(EngineRequest("r", [5, 6, 7], SamplingParams(max_tokens=2)))
    report = engine.load_report()
    assert report["step_s"] == fitted["step_s"] and report["waiting"] == 1  # counts are live
    # ... and a step past it refits them.
    engine._record_rate(StepRecord(100.29 + _REFIT_S, 0, 16, 0.2, 0))
    assert engine.load_report()["step_s"] == pytest.approx((30 * 0.02 + 2 * 0.2) / 32)


def test_the_finish_rate_of_a_burst_comes_from_seat_times_not_from_finishes_counted() -> None:
    from maverick_serve.engine.native.step_rates import StepRecord, finish_rate

    # 40 seats busy for 9 s, then the first 8 requests finish, each after 8 s in its seat: by
    # Little's law 40 / 8 s = 5/s drain, where counting finishes in the window says 8 / 10 s.
    steps = [StepRecord(0.1 * i, 0, 40, 0.1, 0, 40) for i in range(90)]
    steps += [StepRecord(9.0 + 0.1 * i, 0, 40, 0.1, 1, 40, 8.0) for i in range(8)]
    assert finish_rate(steps, sum(r.busy_s for r in steps)) == pytest.approx(5.0)
    # Without seat times (an engine that does not record them): finishes over busy time.
    assert finish_rate([StepRecord(0.0, 0, 4, 0.5, 2)], 0.5) == pytest.approx(4.0)


def test_the_step_time_model_extrapolates_to_the_batch_a_burst_builds() -> None:
    from maverick_serve.engine.native.step_rates import StepRecord, measured_rates, step_model

    # Steps of 4..12 sequences at 5 ms + 1 ms each, plus prefilling steps 10 µs per prompt token.
    decodes = [StepRecord(float(i), 0, 4 + i % 9, 0.005 + 0.001 * (4 + i % 9), 0) for i in range(90)]
    prefills = [StepRecord(100.0 + i, 200, 6, 0.005 + 0.006 + 200 * 1e-5, 0) for i in range(10)]
    base, per_seq = step_model(decodes + prefills)
    # The base carries the mean step's prompt work: 200 tokens in one step of ten, 10 µs each.
    assert base == pytest.approx(0.005 + 20 * 1e-5, rel=1e-6) and per_seq == pytest.approx(0.001, rel=1e-6)
    # One batch size only: the slope is not identifiable, so step time is proportional to the batch.
    flat = [StepRecord(float(i), 0, 8, 0.016, 0) for i in range(50)]
    assert step_model(flat) == (0.0, pytest.approx(0.002))
    assert step_model([StepRecord(0.0, 300, 0, 0.05, 0)]) == (0.0, 0.0)  # nothing decoded: no model
    assert measured_rates(decodes)["batch_p90"] == 12  # batches 4..12, ten steps each


def test_admission_predicts_decode_at_the_batch_the_request_joins() -> None:
    from maverick_serve.routing.state import ReplicaEntry, ReplicaLoad

    load = ReplicaLoad(
        running=4,
        waiting=0,
        max_num_seqs=64,
        prefill_tokens_per_s=10_000.0,
        step_s=0.01,
        finished_per_s=5.0,
        step_base_s=0.005,
        step_per_seq_s=0.001,
    )
    entry = ReplicaEntry("r", 0, load)
    cost = RequestCost(prompt_tokens=100, max_tokens=100)
    adm = Admission(RoutingConfig())
    # 4 running + itself = 5 sequences: 100 × (5 + 5) ms, plus 10 ms of prompt.
    assert adm.own_time_s(entry, cost) == pytest.approx(0.01 + 100 * 0.010)
    entry.sent_requests = 200  # a burst on its way: the batch it joins is full (64 seats)
    assert adm.own_time_s(entry, cost) == pytest.approx(0.01 + 100 * (0.005 + 0.064))
    assert not adm.verdict(entry, cost, 1, budget_s=5.0).admit  # 6.9 s of decode alone
    entry.sent_requests = 0
    assert adm.verdict(entry, cost, 1, budget_s=5.0).admit
    load.batch_p90 = 40.0  # it ran at 40 lately: the next arrivals refill the batch it joins
    assert adm.own_time_s(entry, cost) == pytest.approx(0.01 + 100 * (0.005 + 0.040))
